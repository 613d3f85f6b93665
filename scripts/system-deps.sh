#!/usr/bin/env bash
# System packages loralab needs beyond Python: a Java runtime (METEOR 1.5 and the PTB tokenizer
# of the E2E scorers are Java), Chromium (the report's browser test) and tcmalloc (the loralab
# command preloads it for faster CPU training, loralab/hostmem.py). Installed with apt-get
# when missing and we are root; otherwise we say what is missing and carry on: the features that
# need them fail with a clear message or fall back (tcmalloc: the C library's allocator), and
# their tests skip.
set -u
need=()
command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
compgen -G "/usr/lib*/*/libtcmalloc_minimal.so.4" >/dev/null \
    || compgen -G "/usr/lib*/libtcmalloc_minimal.so.4" >/dev/null || need+=(libtcmalloc-minimal4)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${need[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || echo "warning: could not install ${need[*]}; METEOR/browser/tcmalloc tests will be skipped" >&2
else
    echo "warning: missing system packages ${need[*]} (install them with your package manager)" >&2
fi
exit 0
