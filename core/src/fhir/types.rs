//! FHIR resource type names: every FHIR R4 (4.0.1) resource, plus the resource types Medplum
//! adds (`Project`, `AccessPolicy`, …). Names are case-sensitive: `patient` is not a type.

/// Every R4 resource type (abstract `Resource` and `DomainResource` excluded).
pub const R4_RESOURCE_TYPES: &[&str] = &[
    "Account",
    "ActivityDefinition",
    "AdverseEvent",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "AuditEvent",
    "Basic",
    "Binary",
    "BiologicallyDerivedProduct",
    "BodyStructure",
    "Bundle",
    "CapabilityStatement",
    "CarePlan",
    "CareTeam",
    "CatalogEntry",
    "ChargeItem",
    "ChargeItemDefinition",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "CodeSystem",
    "Communication",
    "CommunicationRequest",
    "CompartmentDefinition",
    "Composition",
    "ConceptMap",
    "Condition",
    "Consent",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DetectedIssue",
    "Device",
    "DeviceDefinition",
    "DeviceMetric",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "EffectEvidenceSynthesis",
    "Encounter",
    "Endpoint",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "EpisodeOfCare",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "ExampleScenario",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "GraphDefinition",
    "Group",
    "GuidanceResponse",
    "HealthcareService",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "ImplementationGuide",
    "InsurancePlan",
    "Invoice",
    "Library",
    "Linkage",
    "List",
    "Location",
    "Measure",
    "MeasureReport",
    "Media",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationKnowledge",
    "MedicationRequest",
    "MedicationStatement",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "MessageHeader",
    "MolecularSequence",
    "NamingSystem",
    "NutritionOrder",
    "Observation",
    "ObservationDefinition",
    "OperationDefinition",
    "OperationOutcome",
    "Organization",
    "OrganizationAffiliation",
    "Parameters",
    "Patient",
    "PaymentNotice",
    "PaymentReconciliation",
    "Person",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "RelatedPerson",
    "RequestGroup",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "ResearchSubject",
    "RiskAssessment",
    "RiskEvidenceSynthesis",
    "Schedule",
    "SearchParameter",
    "ServiceRequest",
    "Slot",
    "Specimen",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Subscription",
    "Substance",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "SupplyDelivery",
    "SupplyRequest",
    "Task",
    "TerminologyCapabilities",
    "TestReport",
    "TestScript",
    "ValueSet",
    "VerificationResult",
    "VisionPrescription",
];

/// Medplum's own resource types (not part of FHIR R4).
pub const MEDPLUM_RESOURCE_TYPES: &[&str] = &[
    "AccessPolicy",
    "Agent",
    "Bot",
    "BulkDataExport",
    "ClientApplication",
    "DomainConfiguration",
    "JsonWebKey",
    "Login",
    "Project",
    "ProjectMembership",
    "SmartAppLaunch",
    "User",
    "UserConfiguration",
    "UserSecurityRequest",
];

/// Every known type: R4 and Medplum, sorted by byte order for `binary_search`. Merged from the
/// two lists above at compile time.
pub const RESOURCE_TYPES: &[&str] = &merge_sorted::<
    { R4_RESOURCE_TYPES.len() + MEDPLUM_RESOURCE_TYPES.len() },
>(R4_RESOURCE_TYPES, MEDPLUM_RESOURCE_TYPES);

/// `a` and `b` (each sorted by bytes) merged in byte order; `N` must be their total length.
const fn merge_sorted<const N: usize>(a: &[&'static str], b: &[&'static str]) -> [&'static str; N] {
    assert!(a.len() + b.len() == N);
    let mut out = [""; N];
    let (mut i, mut j) = (0, 0);
    while i + j < N {
        if j == b.len() || (i < a.len() && bytes_before(a[i].as_bytes(), b[j].as_bytes())) {
            out[i + j] = a[i];
            i += 1;
        } else {
            out[i + j] = b[j];
            j += 1;
        }
    }
    out
}

/// `a < b` in byte order (`Ord` is not usable in a `const fn`).
const fn bytes_before(a: &[u8], b: &[u8]) -> bool {
    let mut k = 0;
    while k < a.len() && k < b.len() {
        if a[k] != b[k] {
            return a[k] < b[k];
        }
        k += 1;
    }
    a.len() < b.len()
}

/// The identity resources fhirgate keeps in its own store and the control API serves as FHIR.
pub const STORED_IDENTITY_TYPES: &[&str] = &[
    "AccessPolicy",
    "ClientApplication",
    "DomainConfiguration",
    "ProjectMembership",
    "Project",
    // A SMART launch context (patient, encounter) an EHR creates before it launches an app.
    "SmartAppLaunch",
    "User",
];

/// Identity types fhirgate keeps no resources of: the control API still answers them (a 403 or
/// nothing there), so that no request for one reaches the upstream FHIR server.
pub const UNSTORED_IDENTITY_TYPES: &[&str] = &[
    "Login",
    "JsonWebKey",
    "IdentityProvider",
    "UserSecurityRequest",
];

/// True for a type the control API serves rather than the upstream (stored or not).
pub fn is_control_type(name: &str) -> bool {
    STORED_IDENTITY_TYPES.contains(&name) || UNSTORED_IDENTITY_TYPES.contains(&name)
}

/// Resource types that own an R4 compartment (`CompartmentDefinition`): a compartment search
/// (`Patient/p1/Observation`) is only meaningful for these.
pub const COMPARTMENT_TYPES: &[&str] = &[
    "Device",
    "Encounter",
    "Patient",
    "Practitioner",
    "RelatedPerson",
];

/// True when `name` is a FHIR R4 or Medplum resource type (case-sensitive).
pub fn is_resource_type(name: &str) -> bool {
    RESOURCE_TYPES.binary_search(&name).is_ok()
}

/// True when `name` owns a compartment (`Patient`, `Encounter`, `RelatedPerson`, `Practitioner`,
/// `Device`).
pub fn is_compartment_type(name: &str) -> bool {
    COMPARTMENT_TYPES.binary_search(&name).is_ok()
}

/// FHIR R4 data types that can end a choice element name (`value[x]` → `valueQuantity`).
pub const CHOICE_TYPES: &[&str] = &[
    "Base64Binary",
    "Boolean",
    "Canonical",
    "Code",
    "Date",
    "DateTime",
    "Decimal",
    "Id",
    "Instant",
    "Integer",
    "Markdown",
    "Oid",
    "PositiveInt",
    "String",
    "Time",
    "UnsignedInt",
    "Uri",
    "Url",
    "Uuid",
    "Address",
    "Age",
    "Annotation",
    "Attachment",
    "CodeableConcept",
    "Coding",
    "ContactPoint",
    "Count",
    "Distance",
    "Duration",
    "HumanName",
    "Identifier",
    "Money",
    "Period",
    "Quantity",
    "Range",
    "Ratio",
    "Reference",
    "SampledData",
    "Signature",
    "Timing",
    "ContactDetail",
    "Contributor",
    "DataRequirement",
    "Expression",
    "ParameterDefinition",
    "RelatedArtifact",
    "TriggerDefinition",
    "UsageContext",
    "Dosage",
    "Meta",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn is_sorted_strictly(list: &[&str]) -> bool {
        list.windows(2).all(|w| w[0].as_bytes() < w[1].as_bytes())
    }

    #[test]
    fn lists_are_sorted_and_unique() {
        assert!(is_sorted_strictly(R4_RESOURCE_TYPES));
        assert!(is_sorted_strictly(MEDPLUM_RESOURCE_TYPES));
        assert!(is_sorted_strictly(RESOURCE_TYPES));
        assert!(is_sorted_strictly(COMPARTMENT_TYPES));
    }

    #[test]
    fn combined_list_is_the_union() {
        assert_eq!(R4_RESOURCE_TYPES.len(), 146);
        assert_eq!(MEDPLUM_RESOURCE_TYPES.len(), 14);
        assert_eq!(
            RESOURCE_TYPES.len(),
            R4_RESOURCE_TYPES.len() + MEDPLUM_RESOURCE_TYPES.len()
        );
        for t in R4_RESOURCE_TYPES.iter().chain(MEDPLUM_RESOURCE_TYPES) {
            assert!(is_resource_type(t), "{t}");
        }
        for t in COMPARTMENT_TYPES {
            assert!(is_resource_type(t), "{t}");
        }
    }

    fn check(name: &str, expected: bool) {
        assert_eq!(is_resource_type(name), expected, "{name:?}");
    }

    #[test]
    fn membership() {
        let table: &[(&str, bool)] = &[
            ("Patient", true),
            ("Observation", true),
            ("Account", true),
            ("VisionPrescription", true),
            ("MedicinalProductUndesirableEffect", true),
            ("Parameters", true),
            ("Bundle", true),
            ("Binary", true),
            ("AccessPolicy", true),
            ("ProjectMembership", true),
            ("UserSecurityRequest", true),
            ("BulkDataExport", true),
            ("SmartAppLaunch", true),
            ("Agent", true),
            ("JsonWebKey", true),
            ("IdentityProvider", false),
            ("Resource", false),
            ("DomainResource", false),
            ("patient", false),
            ("PATIENT", false),
            ("Patient ", false),
            (" Patient", false),
            ("Patients", false),
            ("", false),
            ("*", false),
            ("ActorDefinition", false),
        ];
        for &(name, expected) in table {
            check(name, expected);
        }
    }

    #[test]
    fn compartments() {
        assert!(is_compartment_type("Patient"));
        assert!(is_compartment_type("Encounter"));
        assert!(!is_compartment_type("Observation"));
        assert!(!is_compartment_type("patient"));
    }
}
