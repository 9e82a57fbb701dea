#!/usr/bin/env bash
# Prints the path of a working Python 3.12 interpreter, or explains on stderr and exits 1.
# Order: python3.12 on PATH (if it really runs), then any pyenv-installed 3.12.x.
set -u
try() { "$@" -c 'import sys; assert sys.version_info[:2] == (3, 12); print(sys.executable)' 2>/dev/null; }
try python3.12 && exit 0
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for exe in $(ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r); do
    try "$exe" && exit 0
  done
fi
for exe in /usr/bin/python3.12 /usr/local/bin/python3.12; do
  [ -x "$exe" ] && try "$exe" && exit 0
done
echo "error: hsa-jax needs Python 3.12 (jax 0.11.2 has no wheels for older Pythons)." >&2
echo "       Install it (e.g. 'pyenv install 3.12' or your OS package python3.12) and retry." >&2
exit 1
