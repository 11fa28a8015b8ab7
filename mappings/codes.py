"""HL7 v2 tables mapped to FHIR R4 codes, as data.

Each :class:`CodeMap` names the v2 table, the FHIR element it feeds and the FHIR code system of its
target codes, and links to the HL7 v2-to-FHIR IG concept map it follows (``spec``, the IG's own
CSV, copied in ``shared/corpus/mappings/hl7-v2-to-fhir/codesystems/``) and to the v2 table
(``v2``). Where careloop departs from the IG the entry says why in ``note``.

Lookups are case-insensitive on the v2 code (senders write ``Booked``, ``BOOKED`` and
``booked``) and never raise: an unmapped code gives None and the caller keeps the original
coding or leaves the element out with a warning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "ADDRESS_TYPE",
    "ADDRESS_USE",
    "ADMINISTRATIVE_SEX",
    "ALLERGY_CATEGORY",
    "ALLERGY_CRITICALITY",
    "ALLERGY_SEVERITY",
    "APPOINTMENT_STATUS",
    "CODING_SYSTEMS",
    "COMPLETION_STATUS",
    "DIAGNOSIS_TYPE",
    "ENCOUNTER_CLASS",
    "EVENT_ENCOUNTER_STATUS",
    "IDENTIFIER_TYPE_DISPLAY",
    "INTERPRETATION",
    "MARITAL_STATUS",
    "NAME_USE",
    "OBSERVATION_STATUS",
    "ORDER_CONTROL_STATUS",
    "ORDER_STATUS",
    "RELATIONSHIP",
    "REPORT_STATUS",
    "TELECOM_EQUIPMENT",
    "TELECOM_USE",
    "CodeMap",
    "coding_system_uri",
]

_IG = "https://github.com/HL7/v2-to-fhir/blob/master/mappings/codesystems/"
_V2 = "https://terminology.hl7.org/CodeSystem-v2-{}.html"


def _ig(name: str) -> str:
    return _IG + ("HL7 Concept Map_ " + name + " - Sheet1.csv").replace(" ", "%20")


@dataclass(frozen=True, slots=True)
class CodeMap:
    """One v2 table → FHIR code map: ``codes`` maps the v2 code to (FHIR code, display)."""

    name: str
    v2_table: str
    target: str
    system: str | None
    spec: str
    codes: Mapping[str, tuple[str, str]]
    note: str = ""
    _folded: Mapping[str, tuple[str, str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        folded = {k.upper(): v for k, v in self.codes.items()}
        object.__setattr__(self, "_folded", MappingProxyType(folded))

    @property
    def v2(self) -> str:
        """The v2 table's page on terminology.hl7.org."""
        return _V2.format(self.v2_table)

    def code(self, v2_code: str) -> str | None:
        hit = self._folded.get(v2_code.strip().upper())
        return hit[0] if hit else None

    def coding(self, v2_code: str) -> dict[str, str] | None:
        """The FHIR Coding for ``v2_code`` (needs ``system``), or None when unmapped."""
        hit = self._folded.get(v2_code.strip().upper())
        if hit is None or self.system is None:
            return None
        out = {"system": self.system, "code": hit[0]}
        if hit[1]:
            out["display"] = hit[1]
        return out


def _m(**codes: tuple[str, str]) -> Mapping[str, tuple[str, str]]:
    return MappingProxyType(codes)


def _d(pairs: dict[str, tuple[str, str]]) -> Mapping[str, tuple[str, str]]:
    return MappingProxyType(pairs)


ADMINISTRATIVE_SEX = CodeMap(
    "AdministrativeSex",
    "0001",
    "Patient.gender",
    None,
    _ig("AdministrativeSex"),
    _m(
        F=("female", "Female"),
        M=("male", "Male"),
        O=("other", "Other"),
        U=("unknown", "Unknown"),
        A=("other", "Other"),
        N=("other", "Other"),
    ),
)

NAME_USE = CodeMap(
    "NameType",
    "0200",
    "HumanName.use",
    None,
    _ig("NameType"),
    _d(
        {
            "BAD": ("old", "Old"),
            "D": ("usual", "Usual"),
            "L": ("official", "Official"),
            "M": ("maiden", "Maiden"),
            "MSK": ("anonymous", "Anonymous"),
            "N": ("nickname", "Nickname"),
            "NAV": ("temp", "Temp"),
            "R": ("official", "Official"),
            "TEMP": ("temp", "Temp"),
            "NOUSE": ("old", "Old"),
        }
    ),
    note="NOUSE → old is careloop's addition (the IG leaves it unmapped).",
)

ADDRESS_USE = CodeMap(
    "AddressType[Use]",
    "0190",
    "Address.use",
    None,
    _ig("AddressType[Use]"),
    _d(
        {
            "BA": ("old", "Old"),
            "BI": ("billing", "Billing"),
            "C": ("temp", "Temporary"),
            "B": ("work", "Work"),
            "H": ("home", "Home"),
            "O": ("work", "Work"),
        }
    ),
)

ADDRESS_TYPE = CodeMap(
    "AddressType[Type]",
    "0190",
    "Address.type",
    None,
    _ig("AddressType[Type]"),
    _d({"M": ("postal", "Postal"), "SH": ("postal", "Postal")}),
)

TELECOM_USE = CodeMap(
    "TelecommunicationUseCode",
    "0201",
    "ContactPoint.use",
    None,
    _ig("TelecommunicationUseCode"),
    _d({"PRN": ("home", "Home"), "WPN": ("work", "Work"), "PRS": ("mobile", "Mobile")}),
)

TELECOM_EQUIPMENT = CodeMap(
    "TelecommunicationEquipmentType",
    "0202",
    "ContactPoint.system",
    None,
    _ig("TelecommunicationEquipmentType"),
    _d(
        {
            "PH": ("phone", "Phone"),
            "FX": ("fax", "Fax"),
            "MD": ("other", "Other"),
            "CP": ("phone", "Phone"),
            "SAT": ("other", "Other"),
            "BP": ("pager", "Pager"),
            "INTERNET": ("email", "Email"),
            "X.400": ("email", "Email"),
            "TDD": ("other", "Other"),
            "TTY": ("other", "Other"),
        }
    ),
    note=(
        "The IG maps CP to 'mobile', which is not an R4 ContactPointSystem code: careloop "
        "writes system 'phone' and use 'mobile' instead."
    ),
)

MARITAL_STATUS = CodeMap(
    "MaritalStatus",
    "0002",
    "Patient.maritalStatus",
    "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
    _ig("MaritalStatus"),
    _d(
        {
            "A": ("L", "Legally Separated"),
            "D": ("D", "Divorced"),
            "M": ("M", "Married"),
            "S": ("S", "Never Married"),
            "W": ("W", "Widowed"),
            "C": ("C", "Common Law"),
            "G": ("T", "Domestic partner"),
            "P": ("T", "Domestic partner"),
            "R": ("T", "Domestic partner"),
            "E": ("L", "Legally Separated"),
            "N": ("A", "Annulled"),
            "I": ("I", "Interlocutory"),
            "B": ("U", "unmarried"),
            "U": ("UNK", "Unknown"),
            "O": ("OTH", "Other"),
            "T": ("NAVU", "Not available"),
        }
    ),
)

ENCOUNTER_CLASS = CodeMap(
    "PatientClass[EncounterClass]",
    "0004",
    "Encounter.class",
    "http://terminology.hl7.org/CodeSystem/v3-ActCode",
    _ig("PatientClass[EncounterClass]"),
    _d(
        {
            "E": ("EMER", "emergency"),
            "I": ("IMP", "inpatient encounter"),
            "O": ("AMB", "ambulatory"),
            "P": ("PRENC", "pre-admission"),
        }
    ),
    note=(
        "R, B, C, N and U have no v3-ActCode equivalent (the IG repeats the v2 code); careloop "
        "keeps them in the v2-0004 system instead."
    ),
)

EVENT_ENCOUNTER_STATUS = CodeMap(
    "Event[EncounterStatus]",
    "0003",
    "Encounter.status",
    None,
    _ig("Event[EncounterStatus]"),
    _d(
        {
            "A01": ("in-progress", "In Progress"),
            "A02": ("in-progress", "In Progress"),
            "A03": ("finished", "Finished"),
            "A04": ("planned", "Planned"),
            "A05": ("planned", "Planned"),
            "A06": ("in-progress", "In Progress"),
            "A07": ("in-progress", "In Progress"),
            "A08": ("unknown", "Unknown"),
            "A11": ("cancelled", "Cancelled"),
            "A13": ("in-progress", "In Progress"),
            "A38": ("cancelled", "Cancelled"),
        }
    ),
    note=(
        "A06/A07 (change class) keep the visit in progress and A38 (cancel pre-admit) cancels "
        "it: careloop additions, the IG map stops at A13. A04 (register) is 'planned' as the "
        "IG says, although many outpatient feeds send it on arrival."
    ),
)

APPOINTMENT_STATUS = CodeMap(
    "FillerStatusCodes[Appointment]",
    "0278",
    "Appointment.status",
    None,
    _ig("FillerStatusCodes[Appointment]"),
    _d(
        {
            "PENDING": ("pending", "Pending"),
            "WAITLIST": ("waitlist", "Waitlisted"),
            "BOOKED": ("booked", "Booked"),
            "STARTED": ("checked-in", "Checked In"),
            "COMPLETE": ("fulfilled", "Fulfilled"),
            "CANCELLED": ("cancelled", "Cancelled"),
            "CANCELED": ("cancelled", "Cancelled"),
            "DISCONTINUED": ("cancelled", "Cancelled"),
            "DC": ("cancelled", "Cancelled"),
            "DELETED": ("entered-in-error", "Entered In Error"),
            "NOSHOW": ("noshow", "No Show"),
            "OVERBOOK": ("booked", "Booked"),
            "SCHEDULED": ("booked", "Booked"),
            "ARRIVED": ("arrived", "Arrived"),
            "CHECKED IN": ("checked-in", "Checked In"),
        }
    ),
    note=(
        "Discontinued/Dc → cancelled, Overbook and Scheduled → booked, Arrived → arrived and "
        "the spelling Canceled are careloop additions for real feeds (MSFC sends Dc, NextGen "
        "Scheduled, Corepoint ARRIVED); the IG leaves them unmapped."
    ),
)

ORDER_CONTROL_STATUS = CodeMap(
    "OrderControlCode[ServiceRequest.status]",
    "0119",
    "MedicationRequest.status",
    None,
    _IG + "HL7%20Concept%20Map_%20OrderControlCode%5BServiceRequest.status%5D%20-%20Sheet1.csv",
    _d(
        {
            "AF": ("active", "Active"),
            "CA": ("cancelled", "Cancelled"),
            "CR": ("cancelled", "Cancelled"),
            "DC": ("stopped", "Stopped"),
            "DF": ("stopped", "Stopped"),
            "DR": ("stopped", "Stopped"),
            "FU": ("completed", "Completed"),
            "HD": ("on-hold", "On Hold"),
            "HR": ("on-hold", "On Hold"),
            "NW": ("active", "Active"),
            "OC": ("cancelled", "Cancelled"),
            "OD": ("stopped", "Stopped"),
            "OH": ("on-hold", "On Hold"),
            "OK": ("active", "Active"),
            "PR": ("active", "Active"),
            "PY": ("active", "Active"),
            "RE": ("active", "Active"),
            "RF": ("active", "Active"),
            "RL": ("active", "Active"),
            "RO": ("active", "Active"),
            "RP": ("active", "Active"),
            "RQ": ("active", "Active"),
            "XO": ("active", "Active"),
            "XX": ("active", "Active"),
            "SC": ("active", "Active"),
        }
    ),
    note=(
        "The IG's table targets ServiceRequest (request-status: revoked). MedicationRequest "
        "uses medicationrequest-status, so revoked becomes stopped (DC, OD, DR, DF) or "
        "cancelled (CA, OC, CR), and the IG's CA → active is read as the cancel it requests."
    ),
)

ORDER_STATUS = CodeMap(
    "OrderStatus",
    "0038",
    "MedicationRequest.status",
    None,
    _ig("OrderStatus"),
    _d(
        {
            "CA": ("cancelled", "Cancelled"),
            "CM": ("completed", "Completed"),
            "DC": ("stopped", "Stopped"),
            "ER": ("entered-in-error", "Entered in Error"),
            "HD": ("on-hold", "On Hold"),
            "IP": ("active", "Active"),
            "RP": ("stopped", "Stopped"),
            "SC": ("active", "Active"),
        }
    ),
    note="revoked (request-status) is written stopped/cancelled for MedicationRequest.",
)

REPORT_STATUS = CodeMap(
    "ResultStatus[Non-Queries]",
    "0123",
    "DiagnosticReport.status",
    None,
    _ig("ResultStatus[Non-Queries]"),
    _d(
        {
            "O": ("registered", "Registered"),
            "I": ("registered", "Registered"),
            "S": ("registered", "Registered"),
            "A": ("partial", "Partial"),
            "P": ("preliminary", "Preliminary"),
            "C": ("corrected", "Corrected"),
            "R": ("partial", "Partial"),
            "F": ("final", "Final"),
            "X": ("cancelled", "Cancelled"),
            "M": ("corrected", "Corrected"),
            "N": ("partial", "Partial"),
        }
    ),
    note="A, M and N are careloop additions (the IG leaves them unmapped).",
)

OBSERVATION_STATUS = CodeMap(
    "ObservationResultStatusCodesInterpretation",
    "0085",
    "Observation.status",
    None,
    _ig("ObservationResultStatusCodesInterpretation"),
    _d(
        {
            "A": ("amended", "Amended"),
            "C": ("corrected", "Corrected"),
            "D": ("entered-in-error", "Entered in Error"),
            "F": ("final", "Final"),
            "P": ("preliminary", "Preliminary"),
            "X": ("cancelled", "Cancelled"),
            "W": ("entered-in-error", "Entered in Error"),
            "R": ("preliminary", "Preliminary"),
            "S": ("preliminary", "Preliminary"),
            "I": ("registered", "Registered"),
            "U": ("final", "Final"),
            "V": ("final", "Final"),
            "B": ("amended", "Amended"),
        }
    ),
    note="R, S, I, U, V and B are careloop additions (unmapped in the IG).",
)

INTERPRETATION = CodeMap(
    "InterpretationCodes",
    "0078",
    "Observation.interpretation",
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
    _ig("InterpretationCodes"),
    _d(
        {
            code: (code, display)
            for code, display in {
                "<": "Off scale low",
                ">": "Off scale high",
                "A": "Abnormal",
                "AA": "Critical abnormal",
                "B": "Better",
                "CAR": "Carrier",
                "D": "Significant change down",
                "DET": "Detected",
                "E": "Equivocal",
                "EX": "outside threshold",
                "EXP": "Expected",
                "H": "High",
                "HH": "Critical high",
                "HU": "Significantly high",
                "I": "Intermediate",
                "IE": "Insufficient evidence",
                "IND": "Indeterminate",
                "L": "Low",
                "LL": "Critical low",
                "LU": "Significantly low",
                "MS": "moderately susceptible",
                "N": "Normal",
                "NCL": "No CLSI defined breakpoint",
                "ND": "Not detected",
                "NEG": "Negative",
                "NR": "Non-reactive",
                "NS": "Non-susceptible",
                "POS": "Positive",
                "R": "Resistant",
                "RR": "Reactive",
                "S": "Susceptible",
                "SDD": "Susceptible-dose dependent",
                "SYN-R": "Synergy - resistant",
                "SYN-S": "Synergy - susceptible",
                "U": "Significant change up",
                "UNE": "Unexpected",
                "VS": "very susceptible",
                "W": "Worse",
            }.items()
        }
    ),
)

COMPLETION_STATUS = CodeMap(
    "CompletionStatus",
    "0322",
    "Immunization.status",
    None,
    _ig("CompletionStatus"),
    _d(
        {
            "CP": ("completed", "Completed"),
            "RE": ("not-done", "Not Done"),
            "NA": ("not-done", "Not Done"),
            "PA": ("completed", "Completed"),
        }
    ),
)

ALLERGY_CATEGORY = CodeMap(
    "AllergenType[AllergyIntoleranceCategory]",
    "0127",
    "AllergyIntolerance.category",
    None,
    _ig("AllergenType[AllergyIntoleranceCategory]"),
    _d(
        {
            "DA": ("medication", "Medication"),
            "FA": ("food", "Food"),
            "EA": ("environment", "Environment"),
            "AA": ("biologic", "Biologic"),
            "PA": ("environment", "Environment"),
            "LA": ("environment", "Environment"),
        }
    ),
)

ALLERGY_CRITICALITY = CodeMap(
    "AllergySeverity[AllergyIntolerance.criticality]",
    "0128",
    "AllergyIntolerance.criticality",
    None,
    _ig("AllergySeverity[AllergyIntolerance.criticality]"),
    _d({"SV": ("high", "High Risk"), "MI": ("low", "Low Risk")}),
)

ALLERGY_SEVERITY = CodeMap(
    "AllergySeverity[AllergyIntolerance.reaction.severity]",
    "0128",
    "AllergyIntolerance.reaction.severity",
    None,
    _ig("AllergySeverity[AllergyIntolerance.reaction.severity]"),
    _d({"SV": ("severe", "Severe"), "MO": ("moderate", "Moderate"), "MI": ("mild", "Mild")}),
)

DIAGNOSIS_TYPE = CodeMap(
    "DiagnosisType",
    "0052",
    "Condition.category",
    "http://terminology.hl7.org/CodeSystem/diagnosis-role",
    _ig("DiagnosisType"),
    _d({"A": ("AD", "Admission diagnosis"), "F": ("DD", "Discharge diagnosis")}),
    note="F (final) → DD is careloop's reading; the IG leaves W and F unmapped.",
)

RELATIONSHIP = CodeMap(
    "Relationship",
    "0063",
    "RelatedPerson.relationship",
    "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
    _ig("Relationship"),
    _d(
        {
            "BRO": ("BRO", "brother"),
            "CHD": ("CHILD", "child"),
            "DOM": ("DOMPART", "domestic partner"),
            "FTH": ("FTH", "father"),
            "GRD": ("GUARD", "guardian"),
            "GRP": ("GRPRN", "grandparent"),
            "MTH": ("MTH", "mother"),
            "PAR": ("PRN", "parent"),
            "SIB": ("SIB", "sibling"),
            "SIS": ("SIS", "sister"),
            "SPO": ("SPS", "spouse"),
            "FND": ("FRND", "unrelated friend"),
            "EXF": ("FAMMEMB", "family member"),
            "SEL": ("ONESELF", "self"),
            "OTH": ("O", "other"),
        }
    ),
)

IDENTIFIER_TYPE_DISPLAY: Mapping[str, str] = MappingProxyType(
    {
        # https://terminology.hl7.org/CodeSystem-v2-0203.html
        "AN": "Account number",
        "BC": "Bank Card Number",
        "DL": "Driver's license number",
        "DN": "Doctor number",
        "EI": "Employee number",
        "FI": "Facility ID",
        "MA": "Patient Medicaid number",
        "MC": "Patient's Medicare number",
        "MR": "Medical record number",
        "NH": "National Health Plan Identifier",
        "NI": "National unique individual identifier",
        "NPI": "National provider identifier",
        "PI": "Patient internal identifier",
        "PN": "Person number",
        "PRN": "Provider number",
        "PT": "Patient external identifier",
        "SN": "Subscriber Number",
        "SS": "Social Security number",
        "VN": "Visit number",
        "XX": "Organization identifier",
        "PLAC": "Placer Identifier",
        "FILL": "Filler Identifier",
    }
)

# HL7 table 0396 (coding system names) → FHIR code system URIs.
# https://terminology.hl7.org/CodeSystem-v2-0396.html and https://terminology.hl7.org/external_terminologies.html
CODING_SYSTEMS: Mapping[str, str] = MappingProxyType(
    {
        "LN": "http://loinc.org",
        "LOINC": "http://loinc.org",
        "SCT": "http://snomed.info/sct",
        "SNM": "http://snomed.info/sct",
        "SNOMED": "http://snomed.info/sct",
        "SNM3": "http://snomed.info/sct",
        "I9": "http://hl7.org/fhir/sid/icd-9-cm",
        "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
        "I10": "http://hl7.org/fhir/sid/icd-10",
        "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
        "ICD10CM": "http://hl7.org/fhir/sid/icd-10-cm",
        "I10P": "http://www.cms.gov/Medicare/Coding/ICD10",
        "CVX": "http://hl7.org/fhir/sid/cvx",
        "MVX": "http://terminology.hl7.org/CodeSystem/MVX",
        "NDC": "http://hl7.org/fhir/sid/ndc",
        "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
        "RXN": "http://www.nlm.nih.gov/research/umls/rxnorm",
        "UCUM": "http://unitsofmeasure.org",
        "C4": "http://www.ama-assn.org/go/cpt",
        "CPT": "http://www.ama-assn.org/go/cpt",
        "C5": "http://www.ama-assn.org/go/cpt",
        "HCPCS": "urn:oid:2.16.840.1.113883.6.285",
        "NCIT": "http://ncithesaurus-stage.nci.nih.gov",
        "UMLS": "http://www.nlm.nih.gov/research/umls",
        "ISO3166_1": "urn:iso:std:iso:3166",
        "ISO+": "urn:oid:2.16.840.1.113883.6.8",
        "ISO639": "urn:ietf:bcp:47",
        "CDCREC": "urn:oid:2.16.840.1.113883.6.238",
        "CDCPHINVS": "urn:oid:2.16.840.1.114222.4.5.274",
        "PHINQUESTION": "urn:oid:2.16.840.1.114222.4.5.232",
        "NUCCPROVIDER": "http://nucc.org/provider-taxonomy",
        "HSLOC": "https://www.cdc.gov/nhsn/cdaportal/terminology/codesystem/hsloc.html",
        "CDCGS1VIS": "urn:oid:2.16.840.1.114222.4.5.307",
        "NIP001": "urn:oid:2.16.840.1.114222.4.5.274",
        "NIP002": "urn:oid:2.16.840.1.114222.4.5.274",
        "99ZZZ": "",
        "L": "",
        "LOCAL": "",
    }
)


def coding_system_uri(name: str) -> str | None:
    """The FHIR system URI for a v2 coding system name (CWE-3), or None when unknown.

    ``HL7nnnn`` and ``HL7nnnn``-style names are v2 tables (``v2-nnnn``); a name that is already a
    URI or an OID is used as it is. Local names (``L``, ``99zzz``, vendor codes) have no URI.
    """
    key = name.strip().upper()
    if not key:
        return None
    hit = CODING_SYSTEMS.get(key)
    if hit is not None:
        return hit or None
    if key.startswith("HL7") and key[3:].isdigit() and len(key) >= 7:
        return f"http://terminology.hl7.org/CodeSystem/v2-{key[3:][-4:]}"
    if key.startswith(("99", "L-")):
        return None
    raw = name.strip()
    if raw.startswith(("http://", "https://", "urn:")):
        return raw
    if _is_oid(raw):
        return f"urn:oid:{raw}"
    return None


def _is_oid(text: str) -> bool:
    parts = text.split(".")
    return len(parts) > 2 and all(p.isdigit() for p in parts)
