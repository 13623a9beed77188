"""``--input dicomweb+http://...``: an archive in a real Orthanc, listed by QIDO-RS and read by WADO-RS.

Real parts only: Debian's Orthanc with its DICOMweb plugin on 127.0.0.1 with HTTP basic
authentication (the fixture of ``test_pacs.py``), the real files of its corpus stored by STOW-RS,
a local Ray whose workers read the PACS credentials from their own environment, and the fault
proxy of ``tests/faults_proxy.py`` in front of Orthanc: it counts the WADO-RS reads and answers
503 for a while.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from adcore import storage
from jobs.scoring import dicomweb, pacs, qido
from jobs.scoring import schema as S
from tests.faults_proxy import FaultProxy
from tests.integration.conftest import PASSWORD, STUDY_SECRET, USER
from tests.integration.test_pacs import _sources
from tests.integration.test_score_job import config, visible, write_local

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600), pytest.mark.usefixtures("pacs_credentials")]

WADO_PATH = r"/instances/[0-9.]+$"  # a WADO-RS read of one instance (QIDO-RS searches end in /instances)


def _sop(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def _store(server, files: dict[str, bytes]) -> None:
    sender = pacs.StowSender(server.dicomweb)
    for data in files.values():
        sender.send(data)


def _uids(files: dict[str, bytes]) -> set[str]:
    """Every Study, Series and SOP Instance UID of the files: none may reach analysts' outputs or logs."""
    out = set()
    for data in files.values():
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        out |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    return out


def _by_instance(rows: list[dict], sop_of) -> dict[tuple[str, int], tuple]:
    """(SOP Instance UID, frame) -> (status, error, modality, score) of the visible rows."""
    return {(sop_of(r), r["frame"]): (r["status"], r["error"], r["modality"], r["score"]) for r in rows}


def _same_scores(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][:3] == b[k][:3], k
        assert (a[k][3] is None) == (b[k][3] is None) and (a[k][3] is None or np.isclose(a[k][3], b[k][3])), k


def _texts(folder) -> list[str]:
    """Every value of every Parquet file and the text of every other file under ``folder``."""
    out = []
    for f in storage.list_files(str(folder)):
        if f.endswith(".parquet"):
            out.append(json.dumps(pq.read_table(f).to_pylist(), default=str))
        else:
            out.append(open(f, "rb").read().decode("latin-1"))  # noqa: SIM115
    return out


def test_pacs_archive_scores_as_its_files_and_reruns_unread(
    ray_local, tiny_artifact, orthanc, tmp_path, monkeypatch, caplog, capfd
):
    from jobs.score import main

    monkeypatch.setenv(S.SECRET_ENV, STUDY_SECRET)
    caplog.set_level(logging.INFO)
    files = _sources()
    write_local(tmp_path / "in", files)
    from_files = main(config(input=str(tmp_path / "in"), model=tiny_artifact, output=str(tmp_path / "files")))
    _store(orthanc, files)

    with FaultProxy(orthanc.url, methods=("GET",), paths=WADO_PATH, fail_first=3) as proxy:
        cfg = config(
            input="dicomweb+" + proxy.endpoint + "/dicom-web",
            model=tiny_artifact,
            output=str(tmp_path / "pacs"),
            path_map=str(tmp_path / "restricted" / "map"),
        )
        with pytest.raises(SystemExit, match=f"set {S.SECRET_ENV} .* and --path-map URI"):
            main(replace(cfg, path_map=""))  # UIDs in URIs: pseudonymized unless kept on purpose
        first = main(cfg)
        assert proxy.faults["GET"] == 3  # WADO-RS answered 503 for a while: retried
        assert proxy.gets("/instances/") == len(files)  # each instance read once
        second = main(cfg)  # nothing changed in the PACS
        assert proxy.gets("/instances/") == len(files)  # no instance read again
    assert first["path_privacy"] == "pseudonymize" and first["input_files"] == len(files)
    assert second["rows"] == 0 and second["unchanged_files"] == len(files)

    # The same rows as from the files: count, statuses, errors, modality and score per frame.
    assert first["counts"] == from_files["counts"] and first["rows"] == from_files["rows"]
    sops = {str(tmp_path / "in" / name): _sop(data) for name, data in files.items()}
    mapped = {r["image_key"]: r["image_uri"] for r in pq.read_table(str(tmp_path / "restricted" / "map")).to_pylist()}
    pacs_rows, _ = visible(str(tmp_path / "pacs"))
    file_rows, _ = visible(str(tmp_path / "files"))
    want = _by_instance(file_rows, lambda r: sops[r["image_uri"]])
    assert len(want) == from_files["rows"]
    _same_scores(_by_instance(pacs_rows, lambda r: mapped[r["image_key"]].rsplit("/", 1)[1]), want)

    # No UID in analysts' tables, manifests or logs; the restricted map has them (the search can find them).
    uids = _uids(files)
    texts = [*_texts(tmp_path / "pacs"), caplog.text, *capfd.readouterr()]
    assert not [u for u in uids if any(u in t for t in texts)]
    assert not any(PASSWORD in t for t in texts)
    assert {u for u in uids if any(u in t for t in _texts(tmp_path / "restricted"))} == uids


def test_qido_filters_select_their_instances(ray_local, tiny_artifact, orthanc, tmp_path):
    from jobs.score import list_inputs, main

    files = _sources()
    _store(orthanc, files)
    uri = "dicomweb+" + orthanc.dicomweb

    def listed(**kw) -> set[str]:
        table = list_inputs(uri, filters=qido.Filters(**kw))
        return {u.rsplit("/", 1)[1] for u in table.column("uri").to_pylist()}

    def sops(*names) -> set[str]:
        return {_sop(files[n]) for n in names}

    assert listed() == sops(*files)
    assert listed(modality="CT") == sops("ct/geometry.dcm", "ct/no-frame-of-reference.dcm")
    assert listed(modality="US") == sops("us/two-frames.dcm", "us/bad-uids.dcm")
    assert listed(study_date="20040101-") == sops("ct/geometry.dcm", "us/two-frames.dcm")
    assert listed(study_date="20030805") == sops("rt/dose.dcm")
    assert listed(study_date="20040101-", modality="CT") == sops("ct/geometry.dcm")
    # Paged: a page of one study per listing task, the same instances.
    monkey_page = qido.PAGE
    try:
        qido.PAGE = 1
        assert listed() == sops(*files)
    finally:
        qido.PAGE = monkey_page

    # Through the job, with the UIDs kept on purpose: the CT instances only.
    m = main(
        config(input=uri, model=tiny_artifact, output=str(tmp_path / "ct"), qido_modality="CT", path_privacy="keep")
    )
    rows, _ = visible(str(tmp_path / "ct"))
    assert m["input_files"] == 2 and {r["image_uri"].rsplit("/", 1)[1] for r in rows} == sops(
        "ct/geometry.dcm", "ct/no-frame-of-reference.dcm"
    )
    assert all(r["image_uri"].startswith(uri + "/studies/") for r in rows)


def test_wado_reads_are_bounded_and_carry_no_credential(orthanc):
    from jobs.scoring.stages import Decoder

    files = _sources()
    _store(orthanc, files)
    uri = "dicomweb+" + orthanc.dicomweb
    listing = qido.list_archive(uri, qido.Filters(), lambda fn, args, start: [fn(*a) for a in args])
    big = max(files.values(), key=len)
    target = next(u for u in listing.column("uri").to_pylist() if u.endswith("/" + _sop(big)))

    reader = qido.WadoReader()
    assert reader.read(target, len(big)) == big  # the stored file, not transcoded
    with pytest.raises(dicomweb.TooLarge, match="announced"):
        reader.read(target, 1000)  # refused from Content-Length, before the body is read
    decoder = Decoder(64, 10**8, max_file_bytes=1000)
    batch = {"uri": np.array([target]), "size": np.array([0]), "version": np.array([""]), "prior_sha": np.array([None])}
    row = decoder(batch)
    assert list(row["status"]) == ["error"] and row["error"][0].startswith(S.TOO_LARGE)
    assert _sop(big) not in row["error"][0]

    client = dicomweb.Client(orthanc.dicomweb)
    assert client._headers  # the credentials of the environment...
    for obj in (reader, decoder, client, (uri, ["1.2.3"], qido.Filters())):
        data = pickle.dumps(obj)
        assert PASSWORD.encode() not in data and USER.encode() not in data  # ...never pickled
    assert pickle.loads(pickle.dumps(client))._headers == client._headers  # read again where unpickled


def test_dicomweb_input_flags_are_checked(tiny_artifact, tmp_path):
    from jobs.score import main

    base = config(model=tiny_artifact, output=str(tmp_path / "out"), path_privacy="keep")
    cases = {
        "must not hold credentials": dict(input=f"dicomweb+http://{USER}:{PASSWORD}@127.0.0.1:9/dicom-web"),
        "--qido-study-date": dict(input="dicomweb+http://127.0.0.1:9/dicom-web", qido_study_date="2024-01-01"),
        "--qido-modality": dict(input="dicomweb+http://127.0.0.1:9/dicom-web", qido_modality="ct; drop"),
        "filter a DICOMweb --input": dict(input=str(tmp_path), qido_modality="CT"),
    }
    for message, kw in cases.items():
        with pytest.raises(SystemExit, match=message) as err:
            main(replace(base, **kw))
        assert PASSWORD not in str(err.value)
