"""C-STORE command sets without pydicom datasets (dicom_ai.network.tuning): pynetdicom's bytes,
pynetdicom's datasets and primitives, and pynetdicom's own path for everything else."""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_ai.dimse_status import Status
from dicom_ai.network import tuning
from dicom_ai.service import Service
from tests.conftest import TUNE_NETWORK, need_binary
from tests.peers import make_ct_series, storescu

tuned = pytest.mark.skipif(not TUNE_NETWORK, reason="tests the pynetdicom tuning: "
                           "DICOM_AI_DICOM__TUNE_NETWORK=false runs stock pynetdicom")

_DIMSE_MESSAGES: Any = _dimse_messages  # its `decode`, as decode_msg looks it up

CT = "1.2.840.10008.5.1.4.1.1.2"  # 25 characters: odd
CT_ENHANCED = "1.2.840.10008.5.1.4.1.1.2.1"  # 27: odd
SR_COMPREHENSIVE = "1.2.840.10008.5.1.4.1.1.88.33"  # 29: odd
MR = "1.2.840.10008.5.1.4.1.1.4"  # 25
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # 27
SEG = "1.2.840.10008.5.1.4.1.1.66.4"  # 28: even
INSTANCES = ["1.2", "1.23", "2.25." + "9" * 59, "2.25." + "1" * 58,
             "1.2.826.0.1.3680043.8.498.1234567890"]  # odd, even, 64, 63, 36
STATUSES = [0x0000, 0x0001, 0x0107, 0x0116, 0x0122, 0x0124, 0xA700, 0xA7FF, 0xA900, 0xA9FF,
            0xB000, 0xB006, 0xB007, 0xC000, 0xC211, 0xCFFF, 0xFE00, 0xFFFF]


@pytest.fixture(autouse=True)
def _install() -> None:
    if TUNE_NETWORK:
        assert tuning.install()


class _Counting:
    """Wraps a tuning function: how often it answered (not None) and with what input."""

    def __init__(self, function: Callable[[Any], Any]) -> None:
        self.function = function
        self.answered = 0
        self.declined = 0
        self.taken: list[Any] = []  # the inputs it answered

    def __call__(self, value: Any) -> Any:
        result = self.function(value)
        if result is None:
            self.declined += 1
        else:
            self.answered += 1
            self.taken.append(value)
        return result


@pytest.fixture
def encoder(monkeypatch: pytest.MonkeyPatch) -> _Counting:
    counting = _Counting(tuning.encode_store_response)
    monkeypatch.setattr(tuning, "encode_store_response", counting)
    return counting


@pytest.fixture
def decoder(monkeypatch: pytest.MonkeyPatch) -> _Counting:
    counting = _Counting(tuning.decode_store_request)
    monkeypatch.setattr(tuning, "decode_store_request", counting)
    return counting


# -- C-STORE-RSP -------------------------------------------------------------------------------
@pytest.fixture
def provider() -> tuple[DIMSEServiceProvider, list[P_DATA]]:
    """An association's DIMSE provider (never connected) whose DUL records what it is given."""
    ae = AE(ae_title="FAST")
    assoc = Association(ae, "acceptor")
    assoc.requestor.maximum_length = 16382
    sent: list[P_DATA] = []
    assoc.dul.send_pdu = sent.append  # type: ignore[method-assign,assignment]
    return assoc.dimse, sent


def _response(message_id: int, status: int, sop_class: str | None = CT,
              sop_instance: str | None = INSTANCES[0]) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.Status = status
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    return rsp


def _sent_both_ways(provider: tuple[DIMSEServiceProvider, list[P_DATA]], primitive: Any
                    ) -> tuple[list[Any], list[Any]]:
    """What the tuned ``send_msg`` and pynetdicom's own hand to the DUL for `primitive`."""
    dimse, sent = provider
    dimse.send_msg(primitive, 3)
    tuned_pdvs = [pdata.presentation_data_value_list for pdata in sent]
    sent.clear()
    tuning.UPSTREAM["send_msg"](dimse, primitive, 3)
    upstream_pdvs = [pdata.presentation_data_value_list for pdata in sent]
    sent.clear()
    return tuned_pdvs, upstream_pdvs


@tuned
def test_store_response_bytes_are_pynetdicoms(
        provider: tuple[DIMSEServiceProvider, list[P_DATA]], encoder: _Counting) -> None:
    """Odd and even UIDs, success, warning and failure statuses, message IDs over the range."""
    rng = random.Random(22)
    message_ids = [0, 1, 2, 255, 256, 4096, 32767, 32768, 65534, 65535,
                   *rng.sample(range(65536), 20)]
    classes = [CT, CT_ENHANCED, SR_COMPREHENSIVE, SEG, MR, DX]
    cases = list(itertools.product(classes, INSTANCES, STATUSES))
    count = 0
    for (sop_class, sop_instance, status), message_id in zip(
            cases, itertools.cycle(message_ids), strict=False):
        primitive = _response(message_id, status, sop_class, sop_instance)
        tuned_pdvs, upstream_pdvs = _sent_both_ways(provider, primitive)
        assert tuned_pdvs == upstream_pdvs, (sop_class, sop_instance, hex(status), message_id)
        count += 1
    for message_id in message_ids:  # every message ID with the common case too
        tuned_pdvs, upstream_pdvs = _sent_both_ways(provider, _response(message_id, 0))
        assert tuned_pdvs == upstream_pdvs, message_id
        count += 1
    for status in Status:  # the statuses our handlers return are an IntEnum's members
        if 0 <= status <= 0xFFFF:
            tuned_pdvs, upstream_pdvs = _sent_both_ways(provider, _response(5, status))
            assert tuned_pdvs == upstream_pdvs, status
            count += 1
    assert encoder.answered == count  # the fast path made every one of them
    assert encoder.declined == 0


def test_store_response_bytes_spelled_out() -> None:
    """PS3.7 9.3.1.2 as PS3.5 encodes it (Implicit VR Little Endian), independent of pydicom."""
    encoded = tuning.encode_store_response(_response(0x1234, 0xB007, "1.2.3", "1.2.34"))
    body = (struct.pack("<HHI", 0, 0x0002, 6) + b"1.2.3\0"
            + struct.pack("<HHIH", 0, 0x0100, 2, 0x8001)
            + struct.pack("<HHIH", 0, 0x0120, 2, 0x1234)
            + struct.pack("<HHIH", 0, 0x0800, 2, 0x0101)
            + struct.pack("<HHIH", 0, 0x0900, 2, 0xB007)
            + struct.pack("<HHI", 0, 0x1000, 6) + b"1.2.34")
    assert encoded == struct.pack("<HHII", 0, 0, 4, len(body)) + body


@tuned
@pytest.mark.parametrize("case", ["error comment", "offending element", "no instance uid",
                                  "no class uid", "handler bound", "small pdu", "request",
                                  "echo response"])
def test_anything_else_is_sent_by_pynetdicom(
        case: str, provider: tuple[DIMSEServiceProvider, list[P_DATA]],
        encoder: _Counting) -> None:
    """Whatever the direct encoding does not cover goes through pynetdicom, whose bytes are
    sent unchanged."""
    dimse, _ = provider
    primitive: Any = _response(7, 0xC000)
    if case == "error comment":
        primitive.ErrorComment = "cannot understand"
    elif case == "offending element":
        primitive.OffendingElement = [0x00100010]
    elif case == "no instance uid":
        primitive.AffectedSOPInstanceUID = None
    elif case == "no class uid":
        primitive.AffectedSOPClassUID = None
    elif case == "handler bound":
        seen: list[Any] = []
        dimse.assoc.bind(evt.EVT_DIMSE_SENT, lambda event: seen.append(
            event.message.command_set.Status))
    elif case == "small pdu":
        dimse.assoc.requestor.maximum_length = 64  # the command set needs two fragments
    elif case == "request":
        primitive = C_STORE()
        primitive.MessageID = 9
        primitive.AffectedSOPClassUID = CT
        primitive.AffectedSOPInstanceUID = INSTANCES[1]
        primitive.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    else:
        primitive = C_ECHO()
        primitive.MessageIDBeingRespondedTo = 7
        primitive.Status = 0
    tuned_pdvs, upstream_pdvs = _sent_both_ways(provider, primitive)
    assert tuned_pdvs == upstream_pdvs
    assert tuned_pdvs
    expected_answers = 1 if case in ("handler bound", "small pdu") else 0
    assert encoder.answered == expected_answers  # encoded, yet sent by pynetdicom
    if case == "handler bound":
        assert seen == [0xC000, 0xC000]  # the handler saw the message both times
    if case == "small pdu":
        assert len(tuned_pdvs) == 2


# -- C-STORE-RQ --------------------------------------------------------------------------------
def _request_command(message_id: int = 1, priority: int = 2, sop_class: str = CT,
                     sop_instance: str = INSTANCES[0], originator: str | None = None,
                     originator_id: int | None = None) -> bytes:
    """A C-STORE-RQ command set as pynetdicom's own SCU encodes it."""
    rq = C_STORE()
    rq.MessageID = message_id
    rq.Priority = priority
    rq.AffectedSOPClassUID = sop_class
    rq.AffectedSOPInstanceUID = sop_instance
    rq.MoveOriginatorApplicationEntityTitle = originator
    rq.MoveOriginatorMessageID = originator_id
    rq.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    pdvs = [item for pdata in message.encode_msg(1, 0)
            for item in pdata.presentation_data_value_list]
    return bytes(pdvs[0][1][1:])


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def _handmade(*elements: tuple[int, bytes]) -> bytes:
    """A command set from (element, value) pairs, with its group length first."""
    body = b"".join(_element(e, v) for e, v in elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _decode_both_ways(encoded: bytes, monkeypatch: pytest.MonkeyPatch
                      ) -> tuple[DIMSEMessage, DIMSEMessage]:
    """The message ``decode_msg`` makes of `encoded` (in two PDVs), tuned and upstream."""
    messages = []
    for decode in (_DIMSE_MESSAGES.decode, tuning.UPSTREAM["decode"]):
        with monkeypatch.context() as patch:
            patch.setattr(_dimse_messages, "decode", decode)
            # The command set only: a receiver or C-GET started earlier in this process turns
            # on pynetdicom's process-wide receive-to-file switch, which needs an association.
            patch.setattr(pynetdicom_config, "STORE_RECV_CHUNKED_DATASET", False)
            message = DIMSEMessage()
            middle = len(encoded) // 2
            first, last = P_DATA(), P_DATA()
            first.presentation_data_value_list.append((1, b"\x01" + encoded[:middle]))
            last.presentation_data_value_list.append((1, b"\x03" + encoded[middle:]))
            assert not message.decode_msg(first)
            message.decode_msg(last)
            messages.append(message)
    return messages[0], messages[1]


_PRIMITIVE_FIELDS = ("MessageID", "MessageIDBeingRespondedTo", "AffectedSOPClassUID",
                     "AffectedSOPInstanceUID", "Priority", "MoveOriginatorApplicationEntityTitle",
                     "MoveOriginatorMessageID", "Status", "_context_id")


def _assert_same_message(fast: DIMSEMessage, slow: DIMSEMessage) -> None:
    """The same message class, command set (elements, value types, positions, encoding) and
    primitive."""
    assert type(fast) is type(slow)
    assert fast.context_id == slow.context_id
    assert fast.encoded_command_set.getvalue() == slow.encoded_command_set.getvalue()
    assert fast.encoded_command_set.tell() == slow.encoded_command_set.tell()
    a, b = fast.command_set, slow.command_set
    assert type(a) is type(b) is Dataset
    assert a.original_encoding == b.original_encoding
    assert a._parent_encoding == b._parent_encoding
    assert list(a.keys()) == list(b.keys())
    for tag in sorted(b.keys()):
        x, y = a[tag], b[tag]  # pydicom converts its raw element here
        assert (x.tag, x.VR, x.value, type(x.value), x.file_tell, x.is_undefined_length,
                x.validation_mode) == (y.tag, y.VR, y.value, type(y.value), y.file_tell,
                                       y.is_undefined_length, y.validation_mode)
    assert a == b
    p, q = fast.message_to_primitive(), slow.message_to_primitive()
    assert type(p) is type(q)
    for field in _PRIMITIVE_FIELDS:
        assert getattr(p, field, None) == getattr(q, field, None), field
        assert type(getattr(p, field, None)) is type(getattr(q, field, None)), field


REQUESTS = [
    _request_command(),
    _request_command(0, 0, CT_ENHANCED, INSTANCES[1]),
    _request_command(65535, 1, SEG, INSTANCES[2]),
    _request_command(300, 2, SR_COMPREHENSIVE, INSTANCES[3]),
    _request_command(7, 0, MR, INSTANCES[4], "MOVESCU", 65535),  # a C-MOVE sub-operation
    _request_command(8, 2, DX, INSTANCES[0], "A", 0),
    _request_command(9, 2, CT, INSTANCES[1], "SIXTEEN_CHARS_AE", 12),
    # UIDs padded with a space, an AE title with spaces (both trimmed by pydicom)
    _handmade((0x0002, CT.encode() + b" "), (0x0100, _us(1)), (0x0110, _us(5)),
              (0x0700, _us(0)), (0x0800, _us(0)), (0x1000, b"1.23"),
              (0x1030, b" PACS   "), (0x1031, _us(4))),
    # what dcmtk storescu sends: Command Data Set Type 0x0000 (not 0x0001)
    _handmade((0x0002, CT.encode() + b"\0"), (0x0100, _us(1)), (0x0110, _us(1)),
              (0x0700, _us(2)), (0x0800, _us(0)), (0x1000, INSTANCES[1].encode())),
]


@tuned
@pytest.mark.parametrize("encoded", REQUESTS, ids=range(len(REQUESTS)))
def test_store_request_decoded_as_pydicom_decodes_it(
        encoded: bytes, monkeypatch: pytest.MonkeyPatch, decoder: _Counting) -> None:
    fast, slow = _decode_both_ways(encoded, monkeypatch)
    assert decoder.answered == 1  # the direct decoder made the first
    _assert_same_message(fast, slow)
    assert isinstance(fast, C_STORE_RQ)


BASE = [(0x0002, CT.encode() + b"\0"), (0x0100, _us(1)), (0x0110, _us(1)), (0x0700, _us(2)),
        (0x0800, _us(0x0101)), (0x1000, b"1.23")]
UNUSUAL = {
    "echo request": _handmade((0x0002, b"1.2.840.10008.1.1\0"), (0x0100, _us(0x0030)),
                              (0x0110, _us(1)), (0x0800, _us(0x0101))),
    "store response": _handmade((0x0002, CT.encode() + b"\0"), (0x0100, _us(0x8001)),
                                (0x0120, _us(1)), (0x0800, _us(0x0101)), (0x0900, _us(0)),
                                (0x1000, b"1.23")),
    "extra element": _handmade(*BASE[:5], (0x0902, b"comment "), BASE[5]),
    "no instance uid": _handmade(*BASE[:5]),
    "empty AE title": _handmade(*BASE, (0x1030, b"")),
    "multi-valued UID": _handmade(BASE[0], *BASE[1:5], (0x1000, b"1.2\\1.3\0")),
    "letters in a UID": _handmade(BASE[0], *BASE[1:5], (0x1000, b"1.2.a\0")),
    "non-ASCII AE title": _handmade(*BASE, (0x1030, "PACS\u00e9".encode("latin-1") + b" ")),
    "US of 4 bytes": _handmade(BASE[0], (0x0100, _us(1)), (0x0110, b"\1\0\0\0"), *BASE[3:]),
    "out of order": _handmade(BASE[1], BASE[0], *BASE[2:]),
    "element twice": _handmade(*BASE[:3], BASE[2], *BASE[3:]),
    "truncated": _handmade(*BASE)[:-3],
    "private group": _handmade(*BASE) + struct.pack("<HHI", 0x0009, 0x0010, 2) + b"AB",
}


@tuned
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("name", list(UNUSUAL))
def test_anything_else_is_decoded_by_pydicom(
        name: str, monkeypatch: pytest.MonkeyPatch, decoder: _Counting) -> None:
    encoded = UNUSUAL[name]
    assert tuning.decode_store_request(encoded) is None
    try:
        slow_set = tuning.UPSTREAM["decode"](BytesIO(encoded), True, True)
    except Exception as exc:  # pydicom itself cannot read it: neither path hides that
        with pytest.raises(type(exc)):
            _DIMSE_MESSAGES.decode(BytesIO(encoded), True, True)
        return
    fast_set = _DIMSE_MESSAGES.decode(BytesIO(encoded), True, True)
    assert decoder.declined == 2  # the call above, and decode
    assert decoder.answered == 0
    assert fast_set == slow_set
    assert fast_set.keys() == slow_set.keys()


@tuned
def test_a_conversion_hook_of_pydicom_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a user's data-element callback or conversion hook, pydicom decodes everything."""
    from pydicom import config, hooks

    encoded = REQUESTS[0]
    assert tuning.decode_store_request(encoded) is not None
    monkeypatch.setattr(config, "data_element_callback", lambda raw, **kwargs: raw)
    assert tuning.decode_store_request(encoded) is None
    monkeypatch.setattr(config, "data_element_callback", None)
    monkeypatch.setattr(hooks.hooks, "raw_element_value",
                        lambda raw, data, **kwargs: hooks.raw_element_value(raw, data, **kwargs))
    assert tuning.decode_store_request(encoded) is None


# -- real associations -------------------------------------------------------------------------
def _same_as_pydicom(encoded: bytes) -> None:
    """A command set the direct decoder took, against pydicom's reading of it."""
    fast = tuning.decode_store_request(encoded)
    slow = tuning.UPSTREAM["decode"](BytesIO(encoded), True, True)
    assert fast is not None
    assert fast == slow
    for tag in sorted(slow.keys()):
        assert type(fast[tag].value) is type(slow[tag].value)
        assert fast[tag].file_tell == slow[tag].file_tell


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_dcmtk_storescu_accepts_the_responses(
        service: Service, tmp_path: Path, encoder: _Counting, decoder: _Counting) -> None:
    """dcmtk ``storescu`` sends to the receiver and reads each C-STORE-RSP as a success."""
    need_binary("storescu")
    assert service.address is not None
    files = make_ct_series(tmp_path / "ct", 3, size=32)
    result = storescu(service.address[1], files, extra=["-d"])
    assert result.returncode == 0, result.stdout + result.stderr
    log = result.stdout + result.stderr
    responses = log.split("Message Type                  : C-STORE RSP")[1:]
    assert len(responses) == 3, log
    for number, (path, response) in enumerate(zip(files, responses, strict=True), start=1):
        end = response.split("END DIMSE MESSAGE")[0]  # storescu's reading of each response
        assert f"Message ID Being Responded To : {number}\n" in end, end
        assert "Affected SOP Class UID        : CTImageStorage\n" in end, end
        assert f"Affected SOP Instance UID     : {dcmread(path).SOPInstanceUID}\n" in end, end
        assert "DIMSE Status                  : 0x0000: Success" in end, end
    if TUNE_NETWORK:
        assert encoder.answered == 3  # each response encoded directly
        assert decoder.answered == 3
        for encoded in list(decoder.taken):  # storescu's own command sets, as pydicom reads them
            _same_as_pydicom(encoded)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_pynetdicom_requestor_reads_the_responses(
        service: Service, tmp_path: Path, encoder: _Counting, decoder: _Counting) -> None:
    """pynetdicom's SCU (a C-STORE with a Move Originator, as in a C-MOVE) gets each response
    with the status, message ID and UIDs it expects."""
    assert service.address is not None
    files = make_ct_series(tmp_path / "ct", 2, size=32)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", service.address[1], ae_title="DICOM_AI")
    assert assoc.is_established
    try:
        statuses = []
        for index, path in enumerate(files):
            ds = dcmread(path)
            status = assoc.send_c_store(ds, msg_id=40000 + index,
                                        originator_aet="MOVER", originator_id=77)
            statuses.append((status.Status, ds.SOPInstanceUID))
    finally:
        assoc.release()
    assert [status for status, _ in statuses] == [0, 0]
    if TUNE_NETWORK:
        assert encoder.answered == 2
        assert decoder.answered == 2
        for encoded in list(decoder.taken):
            _same_as_pydicom(encoded)
            assert b"MOVER" in encoded
