/* The wasmrpc module {{name}}, a plain WASI program: the request body is
 * stdin, the reply is stdout, and exit status 0 means success (any other is
 * answered guest_error, with the end of stderr). */
#include <stdio.h>
#include <string.h>

int main(void) {
    char name[4096];
    size_t length = fread(name, 1, sizeof name - 1, stdin);
    name[length] = '\0';
    while (length > 0 && strchr(" \t\r\n", name[length - 1])) {
        name[--length] = '\0';
    }
    if (!feof(stdin)) {
        fprintf(stderr, "expected at most %zu bytes\n", sizeof name - 1);
        return 1;
    }
    printf("hello, %s", name);
    return 0;
}
