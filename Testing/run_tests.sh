#!/usr/bin/env bash
# The whole CaLID test suite, on a fresh machine or again on one where it ran.
#
# Creates (or reuses) the virtual environment .venv at the repository root,
# installs the calid package with its test extras (CPU constraints: no CUDA
# wheels are pulled on a machine without a GPU), then runs pytest. Extra
# arguments go to pytest, e.g.  bash Testing/run_tests.sh -k dicom
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
# torch first, alone: on a CPU machine this takes the local CPU build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c CaLIDCore/constraints-cpu.txt -e "./CaLIDCore[test]"
set +e
.venv/bin/python -m pytest -c Testing/pytest.ini --rootdir Testing "$@"
status=$?
set -e
if [ "$status" -eq 5 ] && [ "$#" -gt 0 ]; then
  # Only a selection (e.g. -k NAME) may match nothing; the whole suite collecting no test is a failure.
  echo "pytest collected no tests (exit code 5): nothing matched the selection $*" >&2
  exit 0
fi
exit "$status"
