"""How well `calid lax --labels` tells a subject's own labels from another subject's.

For every pair (image of subject A, labels of subject B) of ACDC end-diastolic
frames, ``label_fit`` measures the image's median intensity under the labels'
LV cavity divided by that under their myocardium. `calid lax` warns below
``BLOOD_TO_MUSCLE_MINIMUM``. Reported: the range of the ratio for own labels
(A = B) and for other subjects' labels, the false alarms (own labels warned
about) and the share of other subjects' labels caught.

    python Testing/benchmarks/label_fit.py --data ACDC/acdc_edes_labels --out Testing/benchmarks/results

Writes label_fit.json and label_fit.md in --out.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from calid.data.io import read_stack
from calid.geometry.reslice import BLOOD_TO_MUSCLE_MINIMUM, label_fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder of SUBJECT_frameNN.nii.gz images with SUBJECT_frameNN_gt.nii.gz labels")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pairs: dict[str, tuple[Path, Path]] = {}
    for label_file in sorted(Path(args.data).glob("*_frame*_gt.nii.gz")):
        subject = re.sub(r"_frame.*", "", label_file.name)
        image_file = label_file.with_name(label_file.name.replace("_gt", ""))
        if subject not in pairs and image_file.is_file():  # the first frame: end-diastole in ACDC
            pairs[subject] = (image_file, label_file)
    images = {s: read_stack(i) for s, (i, _) in pairs.items()}
    labels = {s: read_stack(lab) for s, (_, lab) in pairs.items()}
    own, other = [], []
    for a in pairs:
        for b in pairs:
            _, ratio = label_fit(labels[b], 0, images[a], 0)
            if ratio is not None:
                (own if a == b else other).append(ratio)
    result = {
        "subjects": list(pairs),
        "threshold": BLOOD_TO_MUSCLE_MINIMUM,
        "own": {"n": len(own), "min": min(own), "max": max(own), "warned": sum(r < BLOOD_TO_MUSCLE_MINIMUM for r in own)},
        "other": {"n": len(other), "min": min(other), "max": max(other), "caught": sum(r < BLOOD_TO_MUSCLE_MINIMUM for r in other)},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "label_fit.json").write_text(json.dumps(result, indent=2) + "\n")
    o, x = result["own"], result["other"]
    (out / "label_fit.md").write_text(
        f"# Label fit: own vs another subject's labels ({len(pairs)} ACDC subjects, end-diastole)\n\n"
        "Ratio of the image's median intensity under the labels' LV cavity to that under their myocardium.\n\n"
        f"| labels | pairs | ratio min | ratio max | below the threshold {BLOOD_TO_MUSCLE_MINIMUM:g} |\n|---|---:|---:|---:|---:|\n"
        f"| own | {o['n']} | {o['min']:.2f} | {o['max']:.2f} | {o['warned']} (false alarms) |\n"
        f"| another subject's | {x['n']} | {x['min']:.2f} | {x['max']:.2f} | {x['caught']} ({100 * x['caught'] / x['n']:.0f} % caught) |\n"
    )
    print((out / "label_fit.md").read_text())


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
