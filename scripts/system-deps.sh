#!/usr/bin/env bash
# System packages loralab needs beyond Python: a Java runtime (METEOR 1.5 and the PTB tokenizer
# of the E2E scorers are Java) and Chromium (the report's browser test). Installed with apt-get
# when missing and we are root; otherwise we say what is missing and carry on: the features that
# need them fail with a clear message, and their tests skip.
set -u
need=()
command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${need[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || echo "warning: could not install ${need[*]}; METEOR/browser tests will be skipped" >&2
else
    echo "warning: missing system packages ${need[*]} (install them with your package manager)" >&2
fi
exit 0
