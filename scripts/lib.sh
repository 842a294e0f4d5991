# Shared by scripts/run and scripts/test: make sure what wasmrpc needs is here.
# Source it; every function exits the script with a clear message on failure.

AMQP_URL="${AMQP_URL:-amqp://127.0.0.1:5672/%2f}"
export AMQP_URL

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The wasm targets the guests are built for: wasip2 as the project ships
# them, and wasm32-unknown-unknown for the import-free builds the benchmarks
# compare with.
ensure_wasm_target() {
    command -v cargo >/dev/null || die "cargo not found: install Rust from https://rustup.rs"
    local target
    for target in wasm32-wasip2 wasm32-wasip1 wasm32-unknown-unknown; do
        if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
            say "adding the $target target"
            rustup target add "$target" || die "cannot add the $target target (rustup target add $target)"
        fi
    done
}

# Host and port of AMQP_URL (amqp[s]://[user[:pass]@]host[:port][/vhost]).
broker_address() {
    local rest="${AMQP_URL#*://}"
    rest="${rest%%/*}"
    rest="${rest##*@}"
    local host="${rest%%:*}" port=5672
    [[ "$rest" == *:* ]] && port="${rest##*:}"
    [[ "$AMQP_URL" == amqps://* && "$rest" != *:* ]] && port=5671
    echo "${host:-127.0.0.1} $port"
}

broker_answers() {
    local host port
    read -r host port < <(broker_address)
    timeout 2 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null
}

# RabbitMQ's server on this machine (Debian's package), installed if need be.
ensure_rabbitmq_installed() {
    command -v rabbitmq-server >/dev/null && return 0
    say "$1: installing Debian's rabbitmq-server"
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    command -v apt-get >/dev/null || die "cannot install RabbitMQ here (no apt-get): install rabbitmq-server yourself"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq rabbitmq-server >/dev/null \
        || die "failed to install rabbitmq-server"
}

# A broker that answers on AMQP_URL: the one running, or a local RabbitMQ
# started (and if need be installed from Debian's packages) here.
ensure_broker() {
    broker_answers && return 0
    local host port
    read -r host port < <(broker_address)
    case "$host" in
        127.0.0.1 | localhost | ::1) ;;
        *) die "no broker answers at $host:$port (AMQP_URL=$AMQP_URL); start it, or unset AMQP_URL to use a local one" ;;
    esac
    ensure_rabbitmq_installed "no broker on $host:$port and RabbitMQ is not installed"
    say "starting RabbitMQ on $host:$port"
    if [[ $(id -u) -eq 0 ]]; then
        rabbitmq-server -detached >/dev/null 2>&1 || true
    else
        sudo rabbitmq-server -detached >/dev/null 2>&1 || sudo service rabbitmq-server start >/dev/null 2>&1 || true
    fi
    for _ in $(seq 120); do
        broker_answers && { say "RabbitMQ is up"; return 0; }
        sleep 1
    done
    die "RabbitMQ did not start within 2 minutes; see /var/log/rabbitmq/"
}

# The toolchains of the guests in other languages (guests/build-lang):
# componentize-py from PyPI, Node.js's npm (componentize-js comes from npm
# with `npm ci` in guests/js), and clang with wasi-libc from Debian.
ensure_guest_toolchains() {
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    local packages=()
    command -v clang >/dev/null || packages+=(clang)
    command -v wasm-ld >/dev/null || packages+=(lld)
    [[ -e /usr/lib/wasm32-wasi/libc.a ]] || packages+=(wasi-libc)
    compgen -G "/usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a" >/dev/null \
        || packages+=(libclang-rt-14-dev-wasm32)
    command -v npm >/dev/null || packages+=(nodejs npm)
    if [[ ${#packages[@]} -gt 0 ]]; then
        command -v apt-get >/dev/null || die "cannot install ${packages[*]} here (no apt-get)"
        say "installing ${packages[*]}, for the C and JavaScript guests"
        $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null \
            || die "failed to install ${packages[*]}"
    fi
    if ! command -v componentize-py >/dev/null; then
        say "installing componentize-py, for the Python guest"
        "${PYTHON:-python3}" -m pip install --quiet --disable-pip-version-check componentize-py==0.25.1 \
            || die "cannot install componentize-py (python3 -m pip install componentize-py==0.25.1)"
    fi
}

# RabbitMQ 3.10 stops supervising the dead-letter workers of quorum queues
# (rabbit_fifo_dlx_sup) once two of them crash within 5 s, which a queue
# deleted while its worker starts can make happen; from then on it refuses
# every quorum queue with at-least-once dead-lettering (INTERNAL_ERROR) until
# it restarts. The tests declare and delete queues all the time: before they
# run, put a local broker's supervisor back if it is gone (nothing else of
# the broker is touched).
ensure_dlx_supervisor() {
    command -v rabbitmqctl >/dev/null || return 0
    local host port pid
    read -r host port < <(broker_address)
    case "$host" in 127.0.0.1 | localhost | ::1) ;; *) return 0 ;; esac
    pid=$(rabbitmqctl eval 'whereis(rabbit_fifo_dlx_sup).' 2>/dev/null) || return 0
    if [[ "$pid" == "undefined" ]]; then
        say "the broker's quorum-queue dead-letter supervisor is down (a RabbitMQ 3.10 fault): restarting it"
        rabbitmqctl eval 'supervisor:restart_child(rabbit_sup, rabbit_fifo_dlx_sup).' >/dev/null \
            || die "cannot restart rabbit_fifo_dlx_sup; restart RabbitMQ"
    fi
}
