"""A bounded fuzz run of PushCard against the live receiver (the long run: `make fuzz`)."""
import pytest

from qkv_core.engine.sender import SenderEngine
from qkv_eval import fuzz

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_fuzzed_card_streams_get_client_statuses_and_the_receiver_serves_on(services, embedded):
    cards = fuzz.base_cards(SenderEngine(embedded))
    report = fuzz.run(services.receiver, cards, cases=2000, seed=1)
    print(report.table())
    assert report.ok, report.failures
    assert report.cases == 2000
    assert {m.__name__ for m in fuzz.MUTATIONS} == set(report.by_mutation)  # every mutation ran
    assert report.statuses["DATA_LOSS"] and report.statuses["INVALID_ARGUMENT"]  # both kinds of refusal seen
