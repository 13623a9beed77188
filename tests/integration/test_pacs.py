"""--pacs-url and C-STORE end to end: every SEG and SR stored in a real Orthanc, in its source's study.

Real parts only: Debian's Orthanc with its DICOMweb plugin (``make setup`` installs it) on
127.0.0.1 with HTTP basic authentication, started per test and stopped by its PID; real files of
pydicom's test data and pydicom-data on an S3 server; a local Ray whose workers read the PACS
credentials from their own environment; ``dciodvfy`` on every object; a fault proxy in front
of Orthanc for a PACS that answers 503 for a while, or all night; Orthanc's DICOM port for C-STORE
(pynetdicom), and a port where nothing listens for a PACS down all night.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from dataclasses import replace

import pydicom
import pytest
from pydicom.data import get_testdata_file

from adcore import storage
from jobs.scoring import dicom_out, pacs
from tests.dicom_checks import dciodvfy_errors
from tests.faults_proxy import FaultProxy
from tests.integration.conftest import PASSWORD, USER
from tests.integration.test_score_job import config, upload, visible, write_local
from tests.orthanc import AET, Orthanc, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420), pytest.mark.usefixtures("pacs_credentials")]

NOTHING = {"sent": 0, "failed": 0}  # no object of an earlier run was waiting
# Kinds of source the job meets in real archives: a CT with geometry; a CT without its frame of
# reference; an ultrasound whose two frames sit in a single-frame IOD; a secondary capture without
# Modality; an RT Dose (not an image: skipped); an ultrasound whose own UIDs are malformed (fails, by
# kind). tests/unit/test_dicom_writer_corpus.py covers every other kind of source, without Ray.
SOURCES = {
    "ct/geometry.dcm": "CT_small.dcm",
    "ct/no-frame-of-reference.dcm": "693_UNCI.dcm",
    "us/two-frames.dcm": "OBXXXX1A_2frame.dcm",
    "sc/no-modality.dcm": "SC_rgb_jpeg_app14_dcmd.dcm",
    "rt/dose.dcm": "rtdose.dcm",
    "us/bad-uids.dcm": "color-pl.dcm",
}


def _sources() -> dict[str, bytes]:
    return {name: open(get_testdata_file(f), "rb").read() for name, f in SOURCES.items()}  # noqa: SIM115


def _objects(root: str, names: list[str]) -> dict[str, pydicom.Dataset]:
    return {n: pydicom.dcmread(io.BytesIO(storage.read_bytes(storage.join(root, n)))) for n in names}


def _in_orthanc(server: Orthanc, objects: dict[str, pydicom.Dataset]) -> set[str]:
    """Names of the objects Orthanc holds, each in its own study."""
    stored = server.instances_by_study()
    return {n for n, ds in objects.items() if ds.SOPInstanceUID in stored.get(ds.StudyInstanceUID, set())}


def test_corpus_objects_valid_and_filed_in_their_studies(
    s3_server, ray_local, tiny_artifact, orthanc, tmp_path, caplog, capfd
):
    from jobs.score import main

    bucket = s3_server.make_bucket("pacs-corpus")
    files = _sources()
    upload(f"{bucket}/in", files)
    caplog.set_level(logging.INFO)
    m = main(
        config(
            input=f"{bucket}/in",
            model=tiny_artifact,
            output=f"{bucket}/scores",
            dicom_output=f"{bucket}/outbox",
            pacs_url=orthanc.dicomweb,
            max_pixels=10**7,
        )
    )

    listed = m["dicom_objects"]
    assert listed["skipped"] == {"RT Dose Storage": 1} and listed["failed"] == {"InvalidSourceUID": 1}
    objects = _objects(m["dicom_output"], dicom_out.read_object_lists(m["dicom_output"], listed["lists"])[0])
    assert m["pacs"] == {
        "sent": len(objects),
        "failed": 0,
        "skipped": 1,
        "unsent_lists": [],
        "earlier_runs": m["pacs"]["earlier_runs"],
    }
    # Every image scored ok has its SR (and at least one SEG) but the skipped and the failed one.
    rows, _ = visible(f"{bucket}/scores")
    images = {r["image_uri"] for r in rows if r["status"] == "ok" and r["modality"] is not None}
    assert images == {f"{bucket}/in/{n}" for n in SOURCES}
    for name in SOURCES:
        uri = f"{bucket}/in/{name}"
        key = dicom_out.object_key(uri)
        mine = [n for n in objects if n.startswith(key)]
        if name in ("rt/dose.dcm", "us/bad-uids.dcm"):
            assert mine == [], name
            continue
        assert sum(n.endswith(".sr.dcm") for n in mine) == 1 and any(n.endswith(".seg.dcm") for n in mine), name
        source = pydicom.dcmread(io.BytesIO(files[name]), stop_before_pixels=True)
        for n in mine:
            if "StudyInstanceUID" in source:
                assert objects[n].StudyInstanceUID == source.StudyInstanceUID  # its source's study
            assert dciodvfy_errors(storage.read_bytes(storage.join(m["dicom_output"], n)), tmp_path) == [], n
    # Orthanc holds every SEG and SR, each in its study.
    assert _in_orthanc(orthanc, objects) == set(objects)
    kinds = {ds.Modality for ds in objects.values()}
    assert kinds == {"SEG", "SR"}
    # The failure is logged by SOP class and kind; no credential, no patient value in any log.
    texts = [caplog.text, *capfd.readouterr()]
    assert any("one Ultrasound Image Storage instance not written: InvalidSourceUID" in t for t in texts)
    bad = pydicom.dcmread(io.BytesIO(files["us/bad-uids.dcm"]), stop_before_pixels=True)
    for needle in (PASSWORD, str(bad.PatientName), str(bad.SOPInstanceUID)):
        assert needle and not any(needle in t for t in texts), needle


def test_pacs_answering_503_for_a_while_gets_every_object(ray_local, tiny_artifact, orthanc, tmp_path):
    from jobs.score import main

    files = {k: v for k, v in _sources().items() if k == "ct/geometry.dcm"}
    write_local(tmp_path / "in", files)
    with FaultProxy(orthanc.url, methods=("POST",), paths=r"^/dicom-web/studies", fail_first=3) as proxy:
        m = main(
            config(
                input=str(tmp_path / "in"),
                model=tiny_artifact,
                output=str(tmp_path / "scores"),
                dicom_output=str(tmp_path / "outbox"),
                pacs_url=proxy.endpoint + "/dicom-web",
                max_pixels=10**7,
            )
        )
    assert proxy.faults["POST"] == 3  # the PACS was down for the first three requests
    objects = _objects(
        m["dicom_output"], dicom_out.read_object_lists(m["dicom_output"], m["dicom_objects"]["lists"])[0]
    )
    assert len(objects) == 2 and m["pacs"]["sent"] == 2 and m["pacs"]["failed"] == 0
    assert _in_orthanc(orthanc, objects) == set(objects)


def test_pacs_down_all_night_gets_the_objects_the_next_night(ray_local, tiny_artifact, orthanc, tmp_path):
    from jobs.score import main

    write_local(tmp_path / "in", {k: v for k, v in _sources().items() if k == "ct/geometry.dcm"})
    cfg = config(
        input=str(tmp_path / "in"),
        model=tiny_artifact,
        output=str(tmp_path / "scores"),
        dicom_output=str(tmp_path / "outbox"),
        pacs_attempts=2,
        max_pixels=10**7,
    )
    with FaultProxy(orthanc.url, methods=("POST",), paths=r"^/dicom-web/studies", fail_first=10**6) as proxy:
        cfg = replace(cfg, pacs_url=proxy.endpoint + "/dicom-web")
        first = main(cfg)
        lists = first["dicom_objects"]["lists"]
        names, unsent = dicom_out.read_object_lists(first["dicom_output"], lists)
        assert first["pacs"]["sent"] == 0 and first["pacs"]["failed"] == 2 and unsent == names and len(names) == 2
        assert proxy.faults["POST"] == 2  # the first object's two tries; then the task stopped sending
        pending = pacs.pending_path(str(tmp_path / "outbox"), first["run_id"])
        assert json.loads(storage.read_bytes(pending)) == {"lists": lists}
        assert orthanc.get("/instances") == []
        proxy.fail_first = 0  # the PACS is back

        second = main(cfg)  # nothing changed: no file read, the pending objects sent
    assert second["rows"] == 0 and second["pacs"]["earlier_runs"] == {"sent": 2, "failed": 0}
    assert not storage.exists(pending)
    objects = _objects(first["dicom_output"], names)
    assert _in_orthanc(orthanc, objects) == set(objects)


def test_credentials_stay_out_of_pickles_and_urls(monkeypatch):
    monkeypatch.setenv(pacs.USER_ENV, USER)
    monkeypatch.setenv(pacs.PASSWORD_ENV, PASSWORD)
    sender = pacs.make_sender("http://127.0.0.1:9/dicom-web")
    writer = dicom_out.DicomWriter("/tmp/x", "RUN", "m", "v", "0", pacs=sender)
    for obj in (sender, writer):
        assert PASSWORD.encode() not in pickle.dumps(obj)
        assert USER.encode() not in pickle.dumps(obj)
    assert pickle.loads(pickle.dumps(sender))._headers == sender._headers  # read again where unpickled
    with pytest.raises(SystemExit, match="must not hold credentials"):
        pacs.check_url(f"http://{USER}:{PASSWORD}@pacs/dicom-web")
    with pytest.raises(SystemExit, match="http"):
        pacs.check_url("pacs:8042")


def test_pacs_url_needs_dicom_output(tiny_artifact, tmp_path):
    from jobs.score import main

    write_local(tmp_path / "in", {"ct.dcm": _sources()["ct/geometry.dcm"]})
    cfg = config(input=str(tmp_path / "in"), model=tiny_artifact, output=str(tmp_path / "out"))
    with pytest.raises(SystemExit, match="--pacs-url needs --dicom-output"):
        main(replace(cfg, pacs_url="http://127.0.0.1:9/dicom-web"))
    with pytest.raises(SystemExit, match="--pacs-aet/--pacs-host/--pacs-port needs --dicom-output"):
        main(replace(cfg, pacs_aet=AET, pacs_host="127.0.0.1", pacs_port=104))


def test_cstore_pending_while_the_pacs_is_down_then_filed_in_their_studies(
    ray_local, tiny_artifact, orthanc, tmp_path, caplog, capfd
):
    """One scoring run while nothing listens at the PACS's port (the Ray tasks try each object and
    keep it), then the next night's run with the PACS back stores them all by C-STORE."""
    from jobs.score import main

    files = {k: v for k, v in _sources().items() if k in ("ct/geometry.dcm", "us/two-frames.dcm")}
    write_local(tmp_path / "in", files)
    cfg = config(
        input=str(tmp_path / "in"),
        model=tiny_artifact,
        output=str(tmp_path / "scores"),
        dicom_output=str(tmp_path / "outbox"),
        pacs_aet=AET,
        pacs_host="127.0.0.1",
        pacs_port=free_port(),  # nothing listens there: the PACS is down all night
        pacs_attempts=2,
        max_pixels=10**7,
    )
    caplog.set_level(logging.INFO)
    first = main(cfg)
    lists = first["dicom_objects"]["lists"]
    names, unsent = dicom_out.read_object_lists(first["dicom_output"], lists)
    assert len(names) >= 4 and first["pacs"]["sent"] == 0 and first["pacs"]["failed"] == len(names)
    assert unsent == names
    assert first["pacs_dicom"] == f"{AET}@127.0.0.1:{cfg.pacs_port}" and "pacs_url" not in first
    pending = pacs.pending_path(str(tmp_path / "outbox"), first["run_id"])
    assert json.loads(storage.read_bytes(pending)) == {"lists": lists}
    assert orthanc.get("/instances") == []

    second = main(replace(cfg, pacs_port=orthanc.dicom_port))  # nothing changed: no file read
    assert second["rows"] == 0 and second["pacs"]["earlier_runs"] == {"sent": len(names), "failed": 0}
    assert not storage.exists(pending)
    objects = _objects(first["dicom_output"], names)
    assert _in_orthanc(orthanc, objects) == set(objects)  # each SEG and SR in its source's study
    studies = {pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True).StudyInstanceUID for b in files.values()}
    assert {ds.StudyInstanceUID for ds in objects.values()} == studies
    assert {ds.Modality for ds in objects.values()} == {"SEG", "SR"}
    texts = [caplog.text, *capfd.readouterr()]
    assert any("not stored in the PACS (no association)" in t for t in texts)  # tried in the tasks
    source = pydicom.dcmread(io.BytesIO(files["us/two-frames.dcm"]), stop_before_pixels=True)
    for needle in (str(source.PatientName), str(source.SOPInstanceUID)):
        assert needle and not any(needle in t for t in texts), needle


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            {"pacs_url": "http://127.0.0.1:9/dicom-web", "pacs_aet": AET, "pacs_host": "h", "pacs_port": 104},
            "not both",
        ),
        ({"pacs_aet": AET, "pacs_port": 104}, "missing --pacs-host"),
        ({"pacs_aet": "A" * 17, "pacs_host": "h", "pacs_port": 104}, "--pacs-aet must be an AE title"),
        ({"pacs_aet": AET, "pacs_host": "h", "pacs_port": 70000}, "--pacs-port must be a TCP port"),
        ({"pacs_aet": AET, "pacs_host": "h", "pacs_port": 104, "pacs_calling_aet": "a\\b"}, "--pacs-calling-aet"),
    ],
)
def test_cstore_flags_refused_with_one_line(tiny_artifact, tmp_path, flags, message):
    from jobs.score import main

    cfg = config(input=str(tmp_path / "in"), model=tiny_artifact, output=str(tmp_path / "out"))
    with pytest.raises(SystemExit, match=message):
        main(replace(cfg, dicom_output=str(tmp_path / "outbox"), **flags))
