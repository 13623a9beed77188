"""C-STORE sender against a real DICOM storage SCP (pynetdicom's) on 127.0.0.1: the statuses and
refusals that are retried, and those that are final.

Orthanc (tests/integration/test_pacs.py) answers success or refuses an association; a PACS out of
disk space answers 0xA700, which only a server that can be told to says on cue.
"""

from __future__ import annotations

import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from jobs.scoring import pacs
from tests.orthanc import free_port

AET = "TEST-SCP"
DATA = open(get_testdata_file("CT_small.dcm"), "rb").read()  # noqa: SIM115 (Explicit VR Little Endian)


@pytest.fixture
def scp(request):
    """A storage SCP (CT Image Storage in ``request.param``'s transfer syntax, Explicit VR LE by default)
    answering the statuses queued in ``scp.answers`` (then success); records what it stored."""
    stored, answers = [], []

    def on_store(event):
        status = answers.pop(0) if answers else 0x0000
        if status == 0x0000:
            stored.append(event.dataset.SOPInstanceUID)
        return status

    ae = AE(ae_title=AET)
    ae.require_called_aet = True
    ae.add_supported_context(CTImageStorage, [getattr(request, "param", ExplicitVRLittleEndian)])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    server.stored, server.answers = stored, answers
    server.port = server.server_address[1]
    yield server
    server.shutdown()


def _sender(port: int, aet: str = AET) -> pacs.CStoreSender:
    s = pacs.make_sender(aet=aet, host="127.0.0.1", port=port, attempts=3)
    s.backoff_s = 0.01
    return s


def test_out_of_resources_is_retried(scp):
    scp.answers[:] = [0xA700, 0xA700]  # out of resources twice, then stored
    _sender(scp.port).send(DATA)
    assert len(scp.stored) == 1 and scp.answers == []


def test_refused_object_is_final(scp):
    scp.answers[:] = [0xA900, 0x0000]  # the data set does not match its SOP class
    with pytest.raises(pacs.PacsError, match="0xA900") as e:
        _sender(scp.port).send(DATA)
    assert not e.value.unavailable and scp.answers == [0x0000] and scp.stored == []  # tried once


def test_unknown_called_aet_is_final(scp):
    with pytest.raises(pacs.PacsError, match="association rejected") as e:
        _sender(scp.port, aet="NOT-THE-PACS").send(DATA)
    assert not e.value.unavailable and scp.stored == []


@pytest.mark.parametrize("scp", [ImplicitVRLittleEndian], indirect=True)
def test_transfer_syntax_the_pacs_refuses_is_final(scp):
    with pytest.raises(pacs.PacsError, match="accepts neither") as e:
        _sender(scp.port).send(DATA)
    assert not e.value.unavailable


def test_nobody_listening_is_unavailable():
    with pytest.raises(pacs.PacsError, match="no association") as e:
        _sender(free_port()).send(DATA)
    assert e.value.unavailable
