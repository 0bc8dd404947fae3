"""DICOM PS3.15 Annex E Table E.1-1, Basic Application Level Confidentiality Profile column.

How this table was compiled
---------------------------
The rows below are the "Basic Prof." column of PS3.15 Table E.1-1 ("Application Level
Confidentiality Profile Attributes"). They were transcribed, row by row, from a machine-readable
extraction of that table (``standard/confidentiality_profile_attributes.json`` of the
innolitics/dicom-standard project, which parses the published HTML of the standard), and each
tag was turned into its keyword with pydicom 3.0.2's data dictionary (every tag resolved). The
extraction does not record which edition it parsed; its content (it already has, e.g., Interlock
DateTime (300A,0741) and Acquisition Field of View Label (0018,11BB), rows added around
2019-2020) matches editions of roughly 2020-2021. It was **not** re-checked row by row against
the current edition: rows the standard added later are missing from :data:`BASIC_PROFILE` unless
they are in :data:`SUPPLEMENT` (which lists, separately and honestly labelled, the identifying
attributes we know pydicom has and the extraction lacks). :mod:`dicom_ai.batch.deidentify`
also has VR-based safety nets for anything not listed (every UI remapped, every DA/DT shifted,
every PN replaced), so a missing row does not leak a UID, date or name.

Keys are DICOM keywords, or a tag pattern for the repeating groups (curves 50xx, overlays 60xx).
Private attributes (odd groups) are not rows here: PS3.15 E.3.10 (Retain Safe Private Option)
is not applied, so every private attribute is removed (the table's "(gggg,eeee) where gggg is
odd" row, action X).

Action codes (PS3.15 E.1.1, Table E.1-1 legend)
-----------------------------------------------
``D`` replace with a non-zero-length dummy value consistent with the VR; ``Z`` replace with a
zero-length value (or a dummy where the attribute is Type 1); ``X`` remove; ``K`` keep; ``C``
clean (an option's action); ``U`` replace the UID with a non-zero-length UID that is internally
consistent within the set of instances. Compound codes leave the choice to the IOD's Type:
``X/Z`` (X unless Type 2: Z), ``X/D`` (X unless Type 1: D), ``Z/D`` (Z unless Type 1: D),
``X/Z/D`` (X unless Type 2: Z, or Type 1: D) and ``X/Z/U*`` (X unless Z, or U for the UIDs of a
sequence's items, is needed for IOD conformance). A de-identifier that does not look up the IOD
must pick an action that is conformant whatever the Type is; :data:`COMPOUND_RESOLUTION` picks
the strictest such one: a zero-length value is legal for Type 2 and 3, a dummy for every Type,
and remapping a sequence's UIDs keeps a Type 1C reference valid. Neither Z nor D carries any of
the original value, so nothing identifying survives either choice. Where the table's plain X
breaks a common IOD (Treatment Machine Name is Type 2 in RT Beams), :data:`CONFORMANCE_OVERRIDES`
uses Z instead.
"""

from __future__ import annotations

from typing import Final

from pydicom.datadict import tag_for_keyword

__all__ = [
    "BASIC_PROFILE",
    "COMPOUND_RESOLUTION",
    "CONFORMANCE_OVERRIDES",
    "SUPPLEMENT",
    "action_for_tag",
    "is_curve_or_overlay",
]

#: PS3.15 Table E.1-1, Basic Profile column: keyword (or repeating-group pattern) -> action.
BASIC_PROFILE: Final[dict[str, str]] = {
    "AffectedSOPInstanceUID": "X",  # (0000,1000)
    "RequestedSOPInstanceUID": "U",  # (0000,1001)
    "MediaStorageSOPInstanceUID": "U",  # (0002,0003)
    "ReferencedSOPInstanceUIDInFile": "U",  # (0004,1511)
    "InstanceCreatorUID": "U",  # (0008,0014)
    "InstanceCoercionDateTime": "X",  # (0008,0015)
    "SOPInstanceUID": "U",  # (0008,0018)
    "StudyDate": "Z",  # (0008,0020)
    "SeriesDate": "X/D",  # (0008,0021)
    "AcquisitionDate": "X/Z",  # (0008,0022)
    "ContentDate": "Z/D",  # (0008,0023)
    "OverlayDate": "X",  # (0008,0024) retired
    "CurveDate": "X",  # (0008,0025) retired
    "AcquisitionDateTime": "X/Z/D",  # (0008,002A)
    "StudyTime": "Z",  # (0008,0030)
    "SeriesTime": "X/D",  # (0008,0031)
    "AcquisitionTime": "X/Z",  # (0008,0032)
    "ContentTime": "Z/D",  # (0008,0033)
    "OverlayTime": "X",  # (0008,0034) retired
    "CurveTime": "X",  # (0008,0035) retired
    "AccessionNumber": "Z",  # (0008,0050)
    "FailedSOPInstanceUIDList": "U",  # (0008,0058)
    "InstitutionName": "X/Z/D",  # (0008,0080)
    "InstitutionAddress": "X",  # (0008,0081)
    "InstitutionCodeSequence": "X/Z/D",  # (0008,0082)
    "ReferringPhysicianName": "Z",  # (0008,0090)
    "ReferringPhysicianAddress": "X",  # (0008,0092)
    "ReferringPhysicianTelephoneNumbers": "X",  # (0008,0094)
    "ReferringPhysicianIdentificationSequence": "X",  # (0008,0096)
    "ConsultingPhysicianName": "Z",  # (0008,009C)
    "ConsultingPhysicianIdentificationSequence": "X",  # (0008,009D)
    "TimezoneOffsetFromUTC": "X",  # (0008,0201)
    "StationName": "X/Z/D",  # (0008,1010)
    "StudyDescription": "X",  # (0008,1030)
    "SeriesDescription": "X",  # (0008,103E)
    "InstitutionalDepartmentName": "X",  # (0008,1040)
    "InstitutionalDepartmentTypeCodeSequence": "X",  # (0008,1041)
    "PhysiciansOfRecord": "X",  # (0008,1048)
    "PhysiciansOfRecordIdentificationSequence": "X",  # (0008,1049)
    "PerformingPhysicianName": "X",  # (0008,1050)
    "PerformingPhysicianIdentificationSequence": "X",  # (0008,1052)
    "NameOfPhysiciansReadingStudy": "X",  # (0008,1060)
    "PhysiciansReadingStudyIdentificationSequence": "X",  # (0008,1062)
    "OperatorsName": "X/Z/D",  # (0008,1070)
    "OperatorIdentificationSequence": "X/D",  # (0008,1072)
    "AdmittingDiagnosesDescription": "X",  # (0008,1080)
    "AdmittingDiagnosesCodeSequence": "X",  # (0008,1084)
    "ReferencedStudySequence": "X/Z",  # (0008,1110)
    "ReferencedPerformedProcedureStepSequence": "X/Z/D",  # (0008,1111)
    "ReferencedPatientSequence": "X",  # (0008,1120)
    "ReferencedImageSequence": "X/Z/U*",  # (0008,1140)
    "ReferencedSOPInstanceUID": "U",  # (0008,1155)
    "TransactionUID": "U",  # (0008,1195)
    "DerivationDescription": "X",  # (0008,2111)
    "SourceImageSequence": "X/Z/U*",  # (0008,2112)
    "IrradiationEventUID": "U",  # (0008,3010)
    "IdentifyingComments": "X",  # (0008,4000) retired
    "PatientName": "Z",  # (0010,0010)
    "PatientID": "Z",  # (0010,0020)
    "IssuerOfPatientID": "X",  # (0010,0021)
    "PatientBirthDate": "Z",  # (0010,0030)
    "PatientBirthTime": "X",  # (0010,0032)
    "PatientSex": "Z",  # (0010,0040)
    "PatientInsurancePlanCodeSequence": "X",  # (0010,0050)
    "PatientPrimaryLanguageCodeSequence": "X",  # (0010,0101)
    "PatientPrimaryLanguageModifierCodeSequence": "X",  # (0010,0102)
    "OtherPatientIDs": "X",  # (0010,1000) retired
    "OtherPatientNames": "X",  # (0010,1001)
    "OtherPatientIDsSequence": "X",  # (0010,1002)
    "PatientBirthName": "X",  # (0010,1005)
    "PatientAge": "X",  # (0010,1010)
    "PatientSize": "X",  # (0010,1020)
    "PatientWeight": "X",  # (0010,1030)
    "PatientAddress": "X",  # (0010,1040)
    "InsurancePlanIdentification": "X",  # (0010,1050) retired
    "PatientMotherBirthName": "X",  # (0010,1060)
    "MilitaryRank": "X",  # (0010,1080)
    "BranchOfService": "X",  # (0010,1081)
    "MedicalRecordLocator": "X",  # (0010,1090) retired
    "ReferencedPatientPhotoSequence": "X",  # (0010,1100)
    "MedicalAlerts": "X",  # (0010,2000)
    "Allergies": "X",  # (0010,2110)
    "CountryOfResidence": "X",  # (0010,2150)
    "RegionOfResidence": "X",  # (0010,2152)
    "PatientTelephoneNumbers": "X",  # (0010,2154)
    "PatientTelecomInformation": "X",  # (0010,2155)
    "EthnicGroup": "X",  # (0010,2160)
    "Occupation": "X",  # (0010,2180)
    "SmokingStatus": "X",  # (0010,21A0)
    "AdditionalPatientHistory": "X",  # (0010,21B0)
    "PregnancyStatus": "X",  # (0010,21C0)
    "LastMenstrualDate": "X",  # (0010,21D0)
    "PatientReligiousPreference": "X",  # (0010,21F0)
    "PatientSexNeutered": "X/Z",  # (0010,2203)
    "ResponsiblePerson": "X",  # (0010,2297)
    "ResponsibleOrganization": "X",  # (0010,2299)
    "PatientComments": "X",  # (0010,4000)
    "ClinicalTrialSponsorName": "D",  # (0012,0010)
    "ClinicalTrialProtocolID": "D",  # (0012,0020)
    "ClinicalTrialProtocolName": "Z",  # (0012,0021)
    "ClinicalTrialSiteID": "Z",  # (0012,0030)
    "ClinicalTrialSiteName": "Z",  # (0012,0031)
    "ClinicalTrialSubjectID": "D",  # (0012,0040)
    "ClinicalTrialSubjectReadingID": "D",  # (0012,0042)
    "ClinicalTrialTimePointID": "Z",  # (0012,0050)
    "ClinicalTrialTimePointDescription": "X",  # (0012,0051)
    "ClinicalTrialCoordinatingCenterName": "Z",  # (0012,0060)
    "ClinicalTrialSeriesID": "X",  # (0012,0071)
    "ClinicalTrialSeriesDescription": "X",  # (0012,0072)
    "ClinicalTrialProtocolEthicsCommitteeName": "D",  # (0012,0081)
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber": "X",  # (0012,0082)
    "MakerNote": "X",  # (0016,002B)
    "DeviceSettingDescription": "X",  # (0016,004B)
    "CameraOwnerName": "X",  # (0016,004D)
    "LensSpecification": "X",  # (0016,004E)
    "LensMake": "X",  # (0016,004F)
    "LensModel": "X",  # (0016,0050)
    "LensSerialNumber": "X",  # (0016,0051)
    "GPSVersionID": "X",  # (0016,0070)
    "GPSLatitudeRef": "X",  # (0016,0071)
    "GPSLatitude": "X",  # (0016,0072)
    "GPSLongitudeRef": "X",  # (0016,0073)
    "GPSLongitude": "X",  # (0016,0074)
    "GPSAltitudeRef": "X",  # (0016,0075)
    "GPSAltitude": "X",  # (0016,0076)
    "GPSTimeStamp": "X",  # (0016,0077)
    "GPSSatellites": "X",  # (0016,0078)
    "GPSStatus": "X",  # (0016,0079)
    "GPSMeasureMode": "X",  # (0016,007A)
    "GPSDOP": "X",  # (0016,007B)
    "GPSSpeedRef": "X",  # (0016,007C)
    "GPSSpeed": "X",  # (0016,007D)
    "GPSTrackRef": "X",  # (0016,007E)
    "GPSTrack": "X",  # (0016,007F)
    "GPSImgDirectionRef": "X",  # (0016,0080)
    "GPSImgDirection": "X",  # (0016,0081)
    "GPSMapDatum": "X",  # (0016,0082)
    "GPSDestLatitudeRef": "X",  # (0016,0083)
    "GPSDestLatitude": "X",  # (0016,0084)
    "GPSDestLongitudeRef": "X",  # (0016,0085)
    "GPSDestLongitude": "X",  # (0016,0086)
    "GPSDestBearingRef": "X",  # (0016,0087)
    "GPSDestBearing": "X",  # (0016,0088)
    "GPSDestDistanceRef": "X",  # (0016,0089)
    "GPSDestDistance": "X",  # (0016,008A)
    "GPSProcessingMethod": "X",  # (0016,008B)
    "GPSAreaInformation": "X",  # (0016,008C)
    "GPSDateStamp": "X",  # (0016,008D)
    "GPSDifferential": "X",  # (0016,008E)
    "ContrastBolusAgent": "Z/D",  # (0018,0010)
    "DeviceSerialNumber": "X/Z/D",  # (0018,1000)
    "DeviceUID": "U",  # (0018,1002)
    "PlateID": "X",  # (0018,1004)
    "GeneratorID": "X",  # (0018,1005)
    "CassetteID": "X",  # (0018,1007)
    "GantryID": "X",  # (0018,1008)
    "UniqueDeviceIdentifier": "X",  # (0018,1009)
    "UDISequence": "X",  # (0018,100A)
    "ManufacturerDeviceClassUID": "U",  # (0018,100B)
    "ProtocolName": "X/D",  # (0018,1030)
    "AcquisitionFieldOfViewLabel": "D",  # (0018,11BB)
    "AcquisitionDeviceProcessingDescription": "X/D",  # (0018,1400)
    "TargetUID": "U",  # (0018,2042)
    "AcquisitionComments": "X",  # (0018,4000) retired
    "TransducerIdentificationSequence": "X",  # (0018,5011)
    "DetectorID": "X/D",  # (0018,700A)
    "RespiratoryMotionCompensationTechniqueDescription": "X",  # (0018,9185)
    "XRaySourceID": "D",  # (0018,9367)
    "SourceStartDateTime": "D",  # (0018,9369)
    "SourceEndDateTime": "D",  # (0018,936A)
    "XRayDetectorID": "D",  # (0018,9371)
    "XRayDetectorLabel": "X",  # (0018,9373)
    "MultienergyAcquisitionDescription": "X",  # (0018,937B)
    "DecompositionDescription": "X",  # (0018,937F)
    "AcquisitionProtocolDescription": "X",  # (0018,9424)
    "StartAcquisitionDateTime": "X/D",  # (0018,9516)
    "EndAcquisitionDateTime": "X/D",  # (0018,9517)
    "RequestedSeriesDescription": "X",  # (0018,9937)
    "ContributionDescription": "X",  # (0018,A003)
    "StudyInstanceUID": "U",  # (0020,000D)
    "SeriesInstanceUID": "U",  # (0020,000E)
    "StudyID": "Z",  # (0020,0010)
    "FrameOfReferenceUID": "U",  # (0020,0052)
    "SynchronizationFrameOfReferenceUID": "U",  # (0020,0200)
    "ModifyingDeviceID": "X",  # (0020,3401) retired
    "ModifiedImageDescription": "X",  # (0020,3406) retired
    "ImageComments": "X",  # (0020,4000)
    "FrameComments": "X",  # (0020,9158)
    "ConcatenationUID": "U",  # (0020,9161)
    "DimensionOrganizationUID": "U",  # (0020,9164)
    "PaletteColorLookupTableUID": "U",  # (0028,1199)
    "LargePaletteColorLookupTableUID": "U",  # (0028,1214) retired
    "ImagePresentationComments": "X",  # (0028,4000) retired
    "StudyIDIssuer": "X",  # (0032,0012) retired
    "ScheduledStudyLocation": "X",  # (0032,1020) retired
    "ScheduledStudyLocationAETitle": "X",  # (0032,1021) retired
    "ReasonForStudy": "X",  # (0032,1030) retired
    "RequestingPhysician": "X",  # (0032,1032)
    "RequestingService": "X",  # (0032,1033)
    "RequestedProcedureDescription": "X/Z",  # (0032,1060)
    "ReasonForVisit": "X",  # (0032,1066)
    "ReasonForVisitCodeSequence": "X",  # (0032,1067)
    "RequestedContrastAgent": "X",  # (0032,1070)
    "StudyComments": "X",  # (0032,4000) retired
    "FlowIdentifierSequence": "D",  # (0034,0001)
    "FlowIdentifier": "D",  # (0034,0002)
    "SourceIdentifier": "D",  # (0034,0005)
    "FrameOriginTimestamp": "D",  # (0034,0007)
    "ReferencedPatientAliasSequence": "X",  # (0038,0004) retired
    "AdmissionID": "X",  # (0038,0010)
    "IssuerOfAdmissionID": "X",  # (0038,0011) retired
    "IssuerOfAdmissionIDSequence": "X",  # (0038,0014)
    "ScheduledPatientInstitutionResidence": "X",  # (0038,001E) retired
    "AdmittingDate": "X",  # (0038,0020)
    "AdmittingTime": "X",  # (0038,0021)
    "DischargeDiagnosisDescription": "X",  # (0038,0040) retired
    "SpecialNeeds": "X",  # (0038,0050)
    "ServiceEpisodeID": "X",  # (0038,0060)
    "IssuerOfServiceEpisodeID": "X",  # (0038,0061) retired
    "ServiceEpisodeDescription": "X",  # (0038,0062)
    "IssuerOfServiceEpisodeIDSequence": "X",  # (0038,0064)
    "CurrentPatientLocation": "X",  # (0038,0300)
    "PatientInstitutionResidence": "X",  # (0038,0400)
    "PatientState": "X",  # (0038,0500)
    "VisitComments": "X",  # (0038,4000)
    "MultiplexGroupUID": "U",  # (003A,0310)
    "ImpedanceMeasurementDateTime": "D",  # (003A,0314)
    "ScheduledStationAETitle": "X",  # (0040,0001)
    "ScheduledProcedureStepStartDate": "X",  # (0040,0002)
    "ScheduledProcedureStepStartTime": "X",  # (0040,0003)
    "ScheduledProcedureStepEndDate": "X",  # (0040,0004)
    "ScheduledProcedureStepEndTime": "X",  # (0040,0005)
    "ScheduledPerformingPhysicianName": "X",  # (0040,0006)
    "ScheduledProcedureStepDescription": "X",  # (0040,0007)
    "ScheduledProcedureStepID": "X",  # (0040,0009)
    "ScheduledPerformingPhysicianIdentificationSequence": "X",  # (0040,000B)
    "ScheduledStationName": "X",  # (0040,0010)
    "ScheduledProcedureStepLocation": "X",  # (0040,0011)
    "PreMedication": "X",  # (0040,0012)
    "PerformedStationAETitle": "X",  # (0040,0241)
    "PerformedStationName": "X",  # (0040,0242)
    "PerformedLocation": "X",  # (0040,0243)
    "PerformedProcedureStepStartDate": "X",  # (0040,0244)
    "PerformedProcedureStepStartTime": "X",  # (0040,0245)
    "PerformedProcedureStepEndDate": "X",  # (0040,0250)
    "PerformedProcedureStepEndTime": "X",  # (0040,0251)
    "PerformedProcedureStepID": "X",  # (0040,0253)
    "PerformedProcedureStepDescription": "X",  # (0040,0254)
    "RequestAttributesSequence": "X",  # (0040,0275)
    "CommentsOnThePerformedProcedureStep": "X",  # (0040,0280)
    "CommentsOnRadiationDose": "X",  # (0040,0310)
    "SpecimenAccessionNumber": "X",  # (0040,050A) retired
    "ContainerIdentifier": "D",  # (0040,0512)
    "IssuerOfTheContainerIdentifierSequence": "Z",  # (0040,0513)
    "ContainerDescription": "X",  # (0040,051A)
    "SpecimenIdentifier": "D",  # (0040,0551)
    "SpecimenUID": "U",  # (0040,0554)
    "AcquisitionContextSequence": "X/Z",  # (0040,0555)
    "IssuerOfTheSpecimenIdentifierSequence": "Z",  # (0040,0562)
    "SpecimenShortDescription": "X",  # (0040,0600)
    "SpecimenDetailedDescription": "X",  # (0040,0602)
    "SpecimenPreparationSequence": "Z",  # (0040,0610)
    "SlideIdentifier": "X",  # (0040,06FA) retired
    "RequestedProcedureID": "X",  # (0040,1001)
    "ReasonForTheRequestedProcedure": "X",  # (0040,1002)
    "PatientTransportArrangements": "X",  # (0040,1004)
    "RequestedProcedureLocation": "X",  # (0040,1005)
    "ReasonForRequestedProcedureCodeSequence": "X",  # (0040,100A)
    "NamesOfIntendedRecipientsOfResults": "X",  # (0040,1010)
    "IntendedRecipientsOfResultsIdentificationSequence": "X",  # (0040,1011)
    "PersonIdentificationCodeSequence": "D",  # (0040,1101)
    "PersonAddress": "X",  # (0040,1102)
    "PersonTelephoneNumbers": "X",  # (0040,1103)
    "PersonTelecomInformation": "X",  # (0040,1104)
    "RequestedProcedureComments": "X",  # (0040,1400)
    "ReasonForTheImagingServiceRequest": "X",  # (0040,2001) retired
    "OrderEnteredBy": "X",  # (0040,2008)
    "OrderEntererLocation": "X",  # (0040,2009)
    "OrderCallbackPhoneNumber": "X",  # (0040,2010)
    "OrderCallbackTelecomInformation": "X",  # (0040,2011)
    "PlacerOrderNumberImagingServiceRequest": "Z",  # (0040,2016)
    "FillerOrderNumberImagingServiceRequest": "Z",  # (0040,2017)
    "ImagingServiceRequestComments": "X",  # (0040,2400)
    "ConfidentialityConstraintOnPatientDataDescription": "X",  # (0040,3001)
    "ScheduledProcedureStepStartDateTime": "X",  # (0040,4005)
    "ScheduledProcedureStepExpirationDateTime": "X",  # (0040,4008)
    "ScheduledProcedureStepModificationDateTime": "X",  # (0040,4010)
    "ExpectedCompletionDateTime": "X",  # (0040,4011)
    "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID": "U",  # (0040,4023) retired
    "ScheduledStationNameCodeSequence": "X",  # (0040,4025)
    "ScheduledStationGeographicLocationCodeSequence": "X",  # (0040,4027)
    "PerformedStationNameCodeSequence": "X",  # (0040,4028)
    "PerformedStationGeographicLocationCodeSequence": "X",  # (0040,4030)
    "ScheduledHumanPerformersSequence": "X",  # (0040,4034)
    "ActualHumanPerformersSequence": "X",  # (0040,4035)
    "HumanPerformerOrganization": "X",  # (0040,4036)
    "HumanPerformerName": "X",  # (0040,4037)
    "PerformedProcedureStepStartDateTime": "X",  # (0040,4050)
    "PerformedProcedureStepEndDateTime": "X",  # (0040,4051)
    "ProcedureStepCancellationDateTime": "X",  # (0040,4052)
    "VerifyingOrganization": "D",  # (0040,A027)
    "VerifyingObserverSequence": "D",  # (0040,A073)
    "VerifyingObserverName": "D",  # (0040,A075)
    "AuthorObserverSequence": "X",  # (0040,A078)
    "ParticipantSequence": "X",  # (0040,A07A)
    "CustodialOrganizationSequence": "X",  # (0040,A07C)
    "VerifyingObserverIdentificationCodeSequence": "Z",  # (0040,A088)
    "PersonName": "D",  # (0040,A123)
    "UID": "U",  # (0040,A124)
    "ObservationUID": "U",  # (0040,A171)
    "ReferencedObservationUIDTrial": "U",  # (0040,A172) retired
    "ObservationDateTrial": "X",  # (0040,A192) retired
    "ObservationTimeTrial": "X",  # (0040,A193) retired
    "CurrentObserverTrial": "X",  # (0040,A307) retired
    "VerbalSourceTrial": "X",  # (0040,A352) retired
    "AddressTrial": "X",  # (0040,A353) retired
    "TelephoneNumberTrial": "X",  # (0040,A354) retired
    "VerbalSourceIdentifierCodeSequenceTrial": "X",  # (0040,A358) retired
    "ObservationSubjectUIDTrial": "U",  # (0040,A402) retired
    "ContentSequence": "D",  # (0040,A730)
    "TemplateExtensionOrganizationUID": "U",  # (0040,DB0C) retired
    "TemplateExtensionCreatorUID": "U",  # (0040,DB0D) retired
    "ContainerComponentID": "X",  # (0050,001B)
    "DeviceDescription": "X",  # (0050,0020)
    "LongDeviceDescription": "X",  # (0050,0021)
    "TrackingUID": "U",  # (0062,0021)
    "GraphicAnnotationSequence": "D",  # (0070,0001)
    "ContentCreatorName": "Z/D",  # (0070,0084)
    "ContentCreatorIdentificationCodeSequence": "X",  # (0070,0086)
    "FiducialUID": "U",  # (0070,031A)
    "PresentationDisplayCollectionUID": "U",  # (0070,1101)
    "PresentationSequenceCollectionUID": "U",  # (0070,1102)
    "StorageMediaFileSetUID": "U",  # (0088,0140)
    "IconImageSequence": "X",  # (0088,0200)
    "TopicTitle": "X",  # (0088,0904) retired
    "TopicSubject": "X",  # (0088,0906) retired
    "TopicAuthor": "X",  # (0088,0910) retired
    "TopicKeywords": "X",  # (0088,0912) retired
    "DigitalSignatureUID": "U",  # (0400,0100)
    "ReferencedDigitalSignatureSequence": "X",  # (0400,0402)
    "ReferencedSOPInstanceMACSequence": "X",  # (0400,0403)
    "MAC": "X",  # (0400,0404)
    "ModifiedAttributesSequence": "X",  # (0400,0550)
    "NonconformingModifiedAttributesSequence": "X",  # (0400,0551)
    "NonconformingDataElementValue": "X",  # (0400,0552)
    "OriginalAttributesSequence": "X",  # (0400,0561)
    "InstanceOriginStatus": "X",  # (0400,0600)
    "TextString": "X",  # (2030,0020)
    "LabelText": "X/Z",  # (2200,0002)
    "BarcodeValue": "X/Z",  # (2200,0005)
    "StructureSetLabel": "D",  # (3006,0002)
    "StructureSetName": "X",  # (3006,0004)
    "StructureSetDescription": "X",  # (3006,0006)
    "StructureSetDate": "Z",  # (3006,0008)
    "StructureSetTime": "X/D",  # (3006,0009)
    "ReferencedFrameOfReferenceUID": "U",  # (3006,0024)
    "ROIName": "Z",  # (3006,0026)
    "ROIDescription": "X",  # (3006,0028)
    "ROIGenerationDescription": "X",  # (3006,0038)
    "ROIObservationLabel": "X",  # (3006,0085) retired
    "ROIObservationDescription": "X",  # (3006,0088) retired
    "ROIInterpreter": "Z",  # (3006,00A6)
    "RelatedFrameOfReferenceUID": "U",  # (3006,00C2) retired
    "FirstTreatmentDate": "X/D",  # (3008,0054)
    "MostRecentTreatmentDate": "X/D",  # (3008,0056)
    "SourceSerialNumber": "X/Z",  # (3008,0105)
    "TreatmentDate": "X/D",  # (3008,0250)
    "TreatmentTime": "X/D",  # (3008,0251)
    "RTPlanLabel": "D",  # (300A,0002)
    "RTPlanName": "X",  # (300A,0003)
    "RTPlanDescription": "X",  # (300A,0004)
    "RTPlanDate": "X/D",  # (300A,0006)
    "RTPlanTime": "X/D",  # (300A,0007)
    "PrescriptionDescription": "X",  # (300A,000E)
    "DoseReferenceUID": "U",  # (300A,0013)
    "DoseReferenceDescription": "X",  # (300A,0016)
    "FractionGroupDescription": "X",  # (300A,0072)
    "ReferencedDoseReferenceUID": "U",  # (300A,0083)
    "TreatmentMachineName": "X",  # (300A,00B2)
    "BeamDescription": "X",  # (300A,00C3)
    "BolusDescription": "X",  # (300A,00DD)
    "FixationDeviceDescription": "X",  # (300A,0196)
    "ShieldingDeviceDescription": "X",  # (300A,01A6)
    "SetupTechniqueDescription": "X",  # (300A,01B2)
    "SourceManufacturer": "X",  # (300A,0216)
    "CompensatorDescription": "X",  # (300A,02EB)
    "TreatmentPositionGroupLabel": "D",  # (300A,0608)
    "TreatmentPositionGroupUID": "U",  # (300A,0609)
    "RTAccessoryHolderSlotID": "Z",  # (300A,0611)
    "RTAccessoryDeviceSlotID": "Z",  # (300A,0615)
    "RadiationDoseIdentificationLabel": "D",  # (300A,0619)
    "RadiationDoseInVivoMeasurementLabel": "D",  # (300A,0623)
    "RTToleranceSetLabel": "D",  # (300A,062A)
    "PatientSetupUID": "U",  # (300A,0650) retired
    "EquipmentFrameOfReferenceDescription": "X",  # (300A,0676)
    "RadiationGenerationModeLabel": "D",  # (300A,067C)
    "RadiationGenerationModeDescription": "Z",  # (300A,067D)
    "TreatmentSessionUID": "U",  # (300A,0700)
    "TreatmentToleranceViolationDescription": "D",  # (300A,0734)
    "TreatmentToleranceViolationDateTime": "D",  # (300A,0736)
    "RecordedRTControlPointDateTime": "D",  # (300A,073A)
    "InterlockDateTime": "D",  # (300A,0741)
    "InterlockDescription": "D",  # (300A,0742)
    "OverrideDateTime": "D",  # (300A,0760)
    "InterlockOriginDescription": "D",  # (300A,0783)
    "ReasonForOmissionDescription": "X",  # (300C,0113)
    "ReviewerName": "X/Z",  # (300E,0008)
    "ConceptualVolumeUID": "U",  # (3010,0006)
    "ReferencedConceptualVolumeUID": "U",  # (3010,000B)
    "ConceptualVolumeCombinationDescription": "Z",  # (3010,000F)
    "ConstituentConceptualVolumeUID": "U",  # (3010,0013)
    "SourceConceptualVolumeUID": "U",  # (3010,0015)
    "ConceptualVolumeDescription": "Z",  # (3010,0017)
    "DeviceAlternateIdentifier": "Z",  # (3010,001B)
    "DeviceLabel": "D",  # (3010,002D)
    "ReferencedFiducialsUID": "U",  # (3010,0031)
    "UserContentLabel": "D",  # (3010,0033)
    "UserContentLongLabel": "D",  # (3010,0034)
    "EntityLabel": "D",  # (3010,0035)
    "EntityName": "X",  # (3010,0036)
    "EntityDescription": "X",  # (3010,0037)
    "EntityLongLabel": "D",  # (3010,0038)
    "RTTreatmentPhaseUID": "U",  # (3010,003B)
    "ManufacturerDeviceIdentifier": "Z",  # (3010,0043)
    "IntendedPhaseStartDate": "X/D",  # (3010,004C)
    "IntendedPhaseEndDate": "X/D",  # (3010,004D)
    "RTPrescriptionLabel": "D",  # (3010,0054)
    "RTTreatmentApproachLabel": "X/D",  # (3010,0056)
    "RTPhysicianIntentNarrative": "Z",  # (3010,005A)
    "ReasonForSuperseding": "Z",  # (3010,005C)
    "PriorTreatmentDoseDescription": "X",  # (3010,0061)
    "DosimetricObjectiveUID": "U",  # (3010,006E)
    "ReferencedDosimetricObjectiveUID": "U",  # (3010,006F)
    "TreatmentSite": "D",  # (3010,0077)
    "TreatmentTechniqueNotes": "Z",  # (3010,007A)
    "PrescriptionNotes": "Z",  # (3010,007B)
    "FractionationNotes": "Z",  # (3010,007F)
    "PrescriptionNotesSequence": "Z",  # (3010,0081)
    "Arbitrary": "X",  # (4000,0010) retired
    "TextComments": "X",  # (4000,4000) retired
    "ResultsIDIssuer": "X",  # (4008,0042) retired
    "InterpretationRecorder": "X",  # (4008,0102) retired
    "InterpretationTranscriber": "X",  # (4008,010A) retired
    "InterpretationText": "X",  # (4008,010B) retired
    "InterpretationAuthor": "X",  # (4008,010C) retired
    "InterpretationApproverSequence": "X",  # (4008,0111) retired
    "PhysicianApprovingInterpretation": "X",  # (4008,0114) retired
    "InterpretationDiagnosisDescription": "X",  # (4008,0115) retired
    "ResultsDistributionListSequence": "X",  # (4008,0118) retired
    "DistributionName": "X",  # (4008,0119) retired
    "DistributionAddress": "X",  # (4008,011A) retired
    "InterpretationIDIssuer": "X",  # (4008,0202) retired
    "Impressions": "X",  # (4008,0300) retired
    "ResultsComments": "X",  # (4008,4000) retired
    "(50xx,xxxx)": "X",  # Curve Data: all of groups 5000-501E (retired)
    "(60xx,3000)": "X",  # Overlay Data, groups 6000-601E
    "(60xx,4000)": "X",  # Overlay Comments, groups 6000-601E
    "DigitalSignaturesSequence": "X",  # (FFFA,FFFA)
    "DataSetTrailingPadding": "X",  # (FFFC,FFFC)
}

#: Identifying attributes in pydicom's dictionary that the extraction above lacks (some are rows
#: of later editions of Table E.1-1, others are identifying by their definition in PS3.3).
#: Not part of the standard's table as transcribed; removed (X) as the safe choice.
SUPPLEMENT: Final[dict[str, str]] = {
    "IssuerOfAccessionNumberSequence": "X",  # (0008,0051) issuing institution
    "RetrieveAETitle": "X",  # (0008,0054) the source archive's AE title
    "StationAETitle": "X",  # (0008,0055) the modality's AE title
    "RetrieveURL": "X",  # (0008,1190) the source archive's address
    "IssuerOfPatientIDQualifiersSequence": "X",  # (0010,0024) assigning facility
    "PatientBirthDateInAlternativeCalendar": "X",  # (0010,0033)
    "PatientDeathDateInAlternativeCalendar": "X",  # (0010,0034)
    "PatientAlternativeCalendar": "X",  # (0010,0035)
    "PixelDataProviderURL": "X",  # (0028,7FE0) the source archive's address
    "RetrieveURI": "X",  # (0040,E010) the source archive's address
    "StorageMediaFileSetID": "X",  # (0088,0130) media label
    "EncryptedAttributesSequence": "X",  # (0400,0500) encrypted originals (PS3.15 E.1.1)
}

#: Rows where the table's X would break a common IOD (the attribute is Type 2 there), so the
#: zero-length value the standard allows for Type 2 is used instead. Z leaks nothing more than X.
CONFORMANCE_OVERRIDES: Final[dict[str, str]] = {
    "TreatmentMachineName": "Z",  # (300A,00B2) Type 2 in RT Beams and RT Ion Beams (PS3.3)
}

#: Compound codes -> the action applied when the IOD (and so the Type) is not looked up.
COMPOUND_RESOLUTION: Final[dict[str, str]] = {
    "X/Z": "Z",
    "X/D": "D",
    "Z/D": "D",
    "X/Z/D": "D",
    "X/Z/U*": "U",
}

_CURVES = "(50xx,xxxx)"


def _resolve(action: str) -> str:
    return COMPOUND_RESOLUTION.get(action, action)


def _build() -> dict[int, str]:
    by_tag: dict[int, str] = {}
    for table in (BASIC_PROFILE, SUPPLEMENT, CONFORMANCE_OVERRIDES):
        for key, action in table.items():
            if key.startswith("("):
                continue  # repeating groups: see action_for_tag
            tag = tag_for_keyword(key)
            if tag is None:  # pragma: no cover - guarded by the unit tests
                raise KeyError(f"{key} is not a keyword of pydicom's data dictionary")
            by_tag[tag] = _resolve(action)
    return by_tag


_BY_TAG: Final[dict[int, str]] = _build()


def is_curve_or_overlay(tag: int) -> bool:
    """Whether ``tag`` is in a curve (50xx) or overlay (60xx) repeating group.

    Parameters
    ----------
    tag : int
        ``(group << 16) | element``.

    Returns
    -------
    bool
        True for even groups 5000-501E and 6000-601E (PS3.5 section 7.6).
    """
    group = tag >> 16
    return (0x5000 <= group <= 0x501E or 0x6000 <= group <= 0x601E) and group % 2 == 0


def action_for_tag(tag: int) -> str | None:
    """The Basic Profile action for a public attribute, compounds resolved.

    Parameters
    ----------
    tag : int
        ``(group << 16) | element``.

    Returns
    -------
    str or None
        One of ``X``, ``Z``, ``D``, ``U`` (PS3.15 Table E.1-1, with
        :data:`COMPOUND_RESOLUTION` and :data:`CONFORMANCE_OVERRIDES` applied); ``X`` for
        every element of the curve and overlay groups (stricter than the table, which lists
        Curve Data, Overlay Data and Overlay Comments only: an overlay without its data is not
        valid); None where the table has no row, private attributes included (the caller
        decides those).
    """
    if is_curve_or_overlay(tag):
        return BASIC_PROFILE[_CURVES] if tag >> 16 < 0x6000 else "X"
    return _BY_TAG.get(tag)
