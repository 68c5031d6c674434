"""linking.agreement: how the fields a customer sent compare with a candidate's record, as
booleans only, for the fields it sent."""

from typing import Any

from linking.agreement import candidate_agreement

RECORD: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "c683023a29175d0a99f8ce671ef80f99",
    "name": [{"use": "official", "text": "Alex Rivera", "family": "Rivera", "given": ["Alex"]}],
    "birthDate": "1975-09-14",
    "telecom": [
        {"system": "phone", "value": "+1-555-0141"},
        {"system": "email", "value": "Alex.Rivera@example.org"},
    ],
    "address": [{"line": ["22 Oak Ave"], "city": "Shelbyville"}],
}


def patient(**overrides: Any) -> dict[str, Any]:
    return {"id": "x", "full_name": "Alex Rivera", "dob": "1975-09-14", **overrides}


def test_every_field_sent_is_compared_and_only_those() -> None:
    sent = patient(
        contact={
            "phone": "(555) 0141",
            "email": "alex.rivera@EXAMPLE.org ",
            "address": "22 Oak Ave, Shelbyville",
        }
    )
    assert candidate_agreement(sent, RECORD) == {
        "family": True,
        "given": True,
        "birth-date": True,
        "phone": False,  # 5550141 is not the record's 15550141's last ten digits
        "email": True,
        "address": True,
    }
    assert candidate_agreement(patient(), RECORD) == {
        "family": True,
        "given": True,
        "birth-date": True,
    }


def test_names_compare_without_case_accents_or_punctuation() -> None:
    assert candidate_agreement(patient(full_name="ALEX RIVÉRA"), RECORD)["family"] is True
    disagree = candidate_agreement(patient(full_name="Alexa Rivers", dob="1975-09-15"), RECORD)
    assert disagree == {"family": False, "given": False, "birth-date": False}
    # A single name is a family name only.
    assert candidate_agreement(patient(full_name="Rivera"), RECORD) == {
        "family": True,
        "birth-date": True,
    }


def test_phones_agree_on_their_last_ten_digits() -> None:
    record = {**RECORD, "telecom": [{"system": "phone", "value": "+1 (217) 555-0141"}]}
    sent = patient(contact={"phone": "217-555-0141"})
    assert candidate_agreement(sent, record)["phone"] is True
    assert candidate_agreement(patient(contact={"phone": "217-555-0142"}), record)["phone"] is False


def test_a_record_without_the_field_does_not_agree() -> None:
    bare = {"resourceType": "Patient", "id": "y"}  # the contract's minimal entry: an id
    sent = patient(contact={"phone": "+1-555-0141", "email": "a@b.org", "address": "1 Main"})
    assert candidate_agreement(sent, bare) == dict.fromkeys(
        ("family", "given", "birth-date", "phone", "email", "address"), False
    )
