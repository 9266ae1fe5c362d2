#!/usr/bin/env bash
# Makes the demo data, Fashion-MNIST, available where params.yaml's data.path expects it.
# Order: already there → Debian package dataset-fashion-mnist (needs root and apt) →
# torchvision's download (needs internet; then data.path is pointed at the download).
set -euo pipefail
python=${1:-python3}
read -r source path < <("$python" -c 'from components.params import load_params; d = load_params().data; print(d.source, d.path)' 2>/dev/null || true)
[[ "$source" == "fashion-mnist" ]] || exit 0  # another source: the user brings the data
if [[ -f "$path/train-images-idx3-ubyte.gz" || -f "$path/train-images-idx3-ubyte" ]]; then exit 0; fi

if [[ "$path" == /usr/share/datasets/fashion-mnist && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing the Debian package dataset-fashion-mnist (Fashion-MNIST, MIT licence)"
  # --reinstall: also restores the files when dpkg lists the package but they were deleted
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall dataset-fashion-mnist >/dev/null; then
    exit 0
  fi
fi

target=data/fashion-mnist
echo "trying torchvision's download of Fashion-MNIST into $target"
if "$python" - "$target" <<'PY'
import shutil, sys, tempfile
from pathlib import Path
from torchvision.datasets import FashionMNIST
target = Path(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    FashionMNIST(tmp, download=True)
    target.mkdir(parents=True, exist_ok=True)
    for f in (Path(tmp) / "FashionMNIST" / "raw").glob("*.gz"):
        shutil.copy(f, target / f.name)
from components.config import apply_overrides, read_params_raw, write_params_raw
write_params_raw(apply_overrides(read_params_raw(), [f"data.path={target}"]))
print(f"downloaded; params.yaml data.path is now {target}")
PY
then exit 0; fi

cat >&2 <<MSG
genpipe: Fashion-MNIST (the demo data) is not at $path and could not be installed.
  Either: as root, apt-get install dataset-fashion-mnist   (Debian/Ubuntu)
  or:     download the four *-ubyte.gz files of Fashion-MNIST into a folder and set data.path in params.yaml
  or:     use your own images: data.source: image-folder, data.path: a folder with one sub-folder per class
MSG
exit 1
