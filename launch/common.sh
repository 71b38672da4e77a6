# shellcheck shell=bash
# Helpers the launchers share; sourced, never run. The sourcing script sets SELF (its own
# path, for messages) and WHAT (variable name -> what it is, with an example).
# shellcheck disable=SC2154  # SELF and WHAT belong to the sourcing script

die() {
  echo "$SELF: error: $*" >&2
  exit 2
}

# require NAME...: each variable set and non-empty, else an error saying what it is.
require() {
  local name
  for name in "$@"; do
    [[ -n ${!name:-} ]] || die "$name is not set: ${WHAT[$name]}"
  done
}

dry_run() { [[ ${DRY_RUN:-0} == 1 ]]; }
