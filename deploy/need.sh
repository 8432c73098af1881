#!/bin/sh
# need.sh COMMAND DEBIAN_PACKAGE: install the package when the command is missing and we are root
# (the validators `make` uses are Debian packages: docker-compose, kubectl); else say what to install.
command -v "$1" >/dev/null && exit 0
if [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq "$2" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }
  command -v "$1" >/dev/null && exit 0
fi
echo "$1 is missing: install Debian's $2 package" >&2
exit 1
