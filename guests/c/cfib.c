/* A plain WASI program in C, served as a module: n on stdin, fib(n) on
 * stdout, exit status 0; anything else is refused on stderr with status 1
 * (a node answers that as guest_error with the end of stderr).
 *
 *   clang --target=wasm32-wasi -O2 -o cfib.wasm cfib.c    (guests/build-lang)
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    char text[32];
    size_t length = fread(text, 1, sizeof text - 1, stdin);
    text[length] = '\0';
    while (length > 0 && isspace((unsigned char)text[length - 1])) {
        text[--length] = '\0';
    }
    char *end;
    long n = strtol(text, &end, 10);
    if (length == 0 || *end != '\0' || n < 0 || n > 93) {
        fprintf(stderr, "expected n from 0 to 93 as decimal text, got \"%s\"\n", text);
        return 1;
    }
    unsigned long long a = 0, b = 1;
    for (long i = 0; i < n; i++) {
        unsigned long long next = a + b;
        a = b;
        b = next;
    }
    printf("%llu", a);
    return 0;
}
