# Shared by the side-venv builders in this folder (sourced, not run). A venv is marked with the package
# list it was built for (VENV/compressor-bench.txt); a builder whose list matches reuses it.

# venv_ready VENV WANTED: prints VENV's python and exits the calling script when VENV was built for WANTED.
venv_ready() {
  if [ -f "$1/compressor-bench.txt" ] && [ "$(cat "$1/compressor-bench.txt")" = "$2" ]; then
    echo "$1/bin/python"
    exit 0
  fi
}

# venv_create VENV: a fresh venv with a current pip; afterwards "${PIP[@]}" installs into it.
venv_create() {
  python3 -m venv "$1"
  PIP=("$1/bin/python" -m pip install -q)
  "${PIP[@]}" --upgrade "pip>=24" >&2
}

# venv_done VENV WANTED: marks VENV as built for WANTED and prints its python.
venv_done() {
  echo "$2" > "$1/compressor-bench.txt"
  echo "$1/bin/python"
}
