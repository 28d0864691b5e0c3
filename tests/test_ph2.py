"""PH2 as a public copy holds it: tab-separated PH2_dataset.txt and PH2_dataset.csv with a byte-order mark, CRLF
line ends and legend rows below the table, .xlsx copies, IMDnnn/IMDnnn_Dermoscopic_Image/IMDnnn.bmp,
IMDnnn_lesion/IMDnnn_lesion.bmp plus a .jpg of the same mask, IMDnnn_roi/*_R1_Label4.bmp region masks, and a
shell script. Tiny BMPs."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermfast.data.adapters import detect_format, open_any
from dermfast.data.ph2 import read_ph2
from dermfast.data.records import DatasetError

CASES = {"IMD002": 1, "IMD003": 0, "IMD008": 2, "IMD009": 0}
LEGEND = ["", "Legend:", "Clinical Diagnosis:", "0 - Common Nevus;", "1 - Atypical Nevus;", "2 - Melanoma."]


def _bmp(path: Path, arr: np.ndarray, fmt="BMP"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def _copy(root: Path, sep: str) -> Path:
    imgs = root / "PH2 Dataset images"
    for k, name in enumerate(CASES):
        case = imgs / name
        img = np.full((12, 16, 3), 40 + 30 * k, np.uint8)
        _bmp(case / f"{name}_Dermoscopic_Image" / f"{name}.bmp", img)
        lesion = np.zeros((12, 16), np.uint8)
        lesion[2 + k:8, 3:9 + k] = 255
        _bmp(case / f"{name}_lesion" / f"{name}_lesion.bmp", lesion)
        _bmp(case / f"{name}_lesion" / f"{name}_lesion.jpg", 255 - lesion, fmt="JPEG")  # a lossy copy: ignored
        _bmp(case / f"{name}_roi" / f"{name}_R1_Label4.bmp", np.full((12, 16), 255, np.uint8))  # not the lesion
    header = ["Image Name", "Histological Diagnosis", "Clinical Diagnosis", "Asymmetry", "Colors"]
    rows = [[n, "", str(c), "0", "3 4"] for n, c in CASES.items()]
    text = "\r\n".join(sep.join(r) for r in [header] + rows + [[x] for x in LEGEND]) + "\r\n"
    (root / "PH2_dataset.txt").write_bytes(b"\xef\xbb\xbf" + text.replace(sep, "\t").encode())
    (root / "PH2_dataset.csv").write_bytes(b"\xef\xbb\xbf" + text.replace(sep, ",").encode())
    (root / "PH2_dataset.xlsx").write_bytes(b"PK\x03\x04 not really a workbook")
    (root / "download.sh").write_text("#!/bin/sh\necho fetch\n")
    return root


@pytest.mark.parametrize("table", [None, "PH2_dataset.txt", "PH2_dataset.csv"])
def test_the_public_copy_reads_with_lesion_masks_and_no_legend_rows(tmp_path, table):
    root = _copy(tmp_path, "\t")
    assert detect_format(root) == "ph2"
    rec = open_any(root) if table is None else read_ph2(root, table=root / table)
    assert [Path(p).stem for p in rec.paths] == list(CASES)
    assert rec.labels.tolist() == list(CASES.values())
    assert rec.missing == []  # the legend lines are not images
    assert [Path(m).name for m in rec.masks] == [f"{n}_lesion.bmp" for n in CASES]  # not the .jpg, not the roi
    m = np.asarray(Image.open(rec.masks[1]))
    assert m[3:8, 3:10].min() == 255 and m[0].max() == 0


def test_original_pipe_table_still_reads(tmp_path):
    root = _copy(tmp_path, "\t")
    lines = ["|| Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry ||"]
    lines += [f"|| {n} ||   || {c} || 0 ||" for n, c in CASES.items()] + LEGEND
    (root / "PH2_dataset.txt").write_text("\r\n".join(lines))
    rec = read_ph2(root)
    assert rec.labels.tolist() == list(CASES.values()) and rec.missing == [] and all(rec.masks)


def test_a_case_without_a_lesion_mask_keeps_its_image(tmp_path):
    root = _copy(tmp_path, "\t")
    for f in (root / "PH2 Dataset images" / "IMD003" / "IMD003_lesion").iterdir():
        if f.suffix == ".bmp":
            f.unlink()
    rec = read_ph2(root)
    assert len(rec) == 4 and rec.masks[1] == "" and all(rec.masks[[0, 2, 3]])


def test_a_table_with_no_recognised_row_names_the_expected_layout(tmp_path):
    root = _copy(tmp_path, "\t")
    (root / "PH2_dataset.txt").write_text("id;diag\r\n1;2\r\n")
    with pytest.raises(DatasetError, match="no PH2 case row recognised.*Clinical Diagnosis"):
        read_ph2(root)
    with pytest.raises(DatasetError, match="Excel"):
        read_ph2(root, table=root / "PH2_dataset.xlsx")


def test_bad_and_torn_case_rows_are_reported(tmp_path):
    root = _copy(tmp_path, "\t")
    text = "Name\tClinical Diagnosis\r\nIMD002\t1\r\nIMD003\t7\r\nIMD404\t2\r\nLegend\r\n"
    (root / "PH2_dataset.txt").write_text(text)
    rec = read_ph2(root)
    assert len(rec) == 1 and dict(rec.missing) == {"IMD003": "unknown clinical diagnosis '7'",
                                                   "IMD404": "image file not found"}
