#!/usr/bin/env bash
# What the tests need besides the Python packages, for `make test` and `.ci/run` alike:
#   - Debian tools the tests drive: dciodvfy (dicom3tools) validates every DICOM object we write; dcmtk plays
#     scanner and PACS; Orthanc + its DICOMweb plugin and Chromium run the real OHIF viewer.
#   - the Node side: dcmjs (OHIF's DICOM library), the built OHIF viewer, playwright-core (driving Debian's
#     chromium; it never downloads a browser), installed from tests/js/package-lock.json.
# Installs what is missing when it can (root with apt-get); otherwise names what is missing and how to get it,
# and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."

read -r -a APT_PACKAGES <<< "${ONEVLM_TEST_APT_PACKAGES:-dicom3tools dcmtk orthanc orthanc-dicomweb chromium}"

have_package() {  # dpkg where there is one; elsewhere the program (or plugin) the package provides
  if command -v dpkg >/dev/null 2>&1; then
    dpkg -s "$1" >/dev/null 2>&1 && return 0 || return 1
  fi
  case "$1" in
    dicom3tools) command -v dciodvfy >/dev/null ;;
    dcmtk) command -v storescp >/dev/null && command -v storescu >/dev/null ;;
    orthanc) command -v Orthanc >/dev/null ;;
    orthanc-dicomweb) ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1 ;;
    chromium) command -v chromium >/dev/null ;;
  esac
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  have_package "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test-deps: installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "test-deps: missing Debian package(s): ${missing[*]}" >&2
    if command -v apt-get >/dev/null 2>&1; then
      echo "  install them as root:  sudo apt-get install --no-install-recommends ${missing[*]}" >&2
    else
      echo "  this system has no apt-get: install the equivalents of ${missing[*]} (dciodvfy, dcmtk's" >&2
      echo "  storescu/storescp/echoscu, Orthanc 1.10+ with its DICOMweb plugin, Chromium) and put them on PATH" >&2
    fi
    exit 1
  fi
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "test-deps: Node.js >= 20 with npm is missing (the dcmjs and OHIF tests run on it):" >&2
  echo "  sudo apt-get install nodejs npm   (or any Node.js >= 20 on PATH)" >&2
  exit 1
fi
if [ ! -f tests/js/node_modules/.package-lock.json ] || [ tests/js/package-lock.json -nt tests/js/node_modules/.package-lock.json ]; then
  echo "test-deps: installing the Node test tools (npm ci in tests/js)"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/js --no-audit --no-fund --loglevel=error
fi
