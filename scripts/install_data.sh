#!/bin/sh
# Make Fashion-MNIST available: Debian's dataset-fashion-mnist where apt exists and we are root,
# otherwise say how to point pocketdiff at a folder of the idx files.
set -e
if [ -n "$POCKETDIFF_DATA" ] && [ -f "$POCKETDIFF_DATA/t10k-images-idx3-ubyte.gz" -o -f "$POCKETDIFF_DATA/t10k-images-idx3-ubyte" ]; then
  exit 0
fi
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  exit 0
fi
echo "Fashion-MNIST is not installed. As root on Debian: apt-get install -y dataset-fashion-mnist;" >&2
echo "elsewhere set POCKETDIFF_DATA to a folder holding the four Fashion-MNIST idx files (.gz or not)." >&2
echo "Continuing: commands that need the data will say so." >&2
