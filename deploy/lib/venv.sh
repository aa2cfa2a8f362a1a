# Sourced by the check scripts that need Python tools: venv_install DIR PACKAGE... creates the
# venv DIR (installing Debian's python3-venv first when `python3 -m venv` is missing) and
# installs the pinned packages into it.
venv_install() {
  local venv=$1
  shift
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian ships venv separately.
    rm -rf "$venv"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; } \
      || { echo "$(basename "$0"): python3 -m venv is unavailable and python3-venv could not be installed" >&2; return 1; }
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"
}
