//! The checks of a resource about to be written, shared by the gateway and `policy explain`:
//! a create loses its client-chosen `id` and is stamped with the policy's compartment; the
//! entry that allows the write (on the new resource for a create, on the current version for an
//! update) restores what the caller may not set; the result must still satisfy the policy and
//! the entry's write constraints.

use serde_json::Value;

use super::EffectivePolicy;
use super::fhirpath::write_constraints_hold;
use crate::fhir::request::Interaction;

/// Why a write is refused; [`WriteRefusal::label`] is the denial's stable label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteRefusal {
    /// The new resource of a create satisfies no entry granting create.
    CreateOutsideCriteria,
    /// The current version satisfies no entry granting update.
    CurrentOutsideCriteria,
    /// After the protected fields are restored, the result satisfies no entry.
    ResultOutsideCriteria,
    /// The entry's writeConstraint does not hold.
    WriteConstraint,
}

impl WriteRefusal {
    pub fn label(self) -> &'static str {
        match self {
            // A create's result is its new resource: the same words either way.
            WriteRefusal::CreateOutsideCriteria => "create_outside_criteria",
            WriteRefusal::CurrentOutsideCriteria => "current_outside_criteria",
            WriteRefusal::ResultOutsideCriteria => "result_outside_criteria",
            WriteRefusal::WriteConstraint => "write_constraint",
        }
    }
}

impl EffectivePolicy {
    /// Checks (and prepares) `new` for writing over `current` (`None`: a create, or an update
    /// that creates). See the module documentation.
    pub fn check_write(
        &self,
        new: &mut Value,
        current: Option<&Value>,
    ) -> Result<(), WriteRefusal> {
        if new
            .get("resourceType")
            .and_then(Value::as_str)
            .is_some_and(|t| self.isolates(t))
        {
            self.isolation().stamp(new);
        }
        let (interaction, outside, result_outside) = match current {
            Some(_) => (
                Interaction::Update,
                WriteRefusal::CurrentOutsideCriteria,
                WriteRefusal::ResultOutsideCriteria,
            ),
            None => {
                self.stamp_account(new);
                (
                    Interaction::Create,
                    WriteRefusal::CreateOutsideCriteria,
                    WriteRefusal::CreateOutsideCriteria,
                )
            }
        };
        let basis = current.unwrap_or(new);
        let entry = self.satisfied(basis, interaction).cloned().ok_or(outside)?;
        self.restore_protected_fields(new, current, &entry);
        let after = self.satisfied(new, interaction).ok_or(result_outside)?;
        if !write_constraints_hold(&after.write_constraints, new, current) {
            return Err(WriteRefusal::WriteConstraint);
        }
        Ok(())
    }

    /// [`Self::check_write`] for a create (`POST`, or a create inside a Bundle). The upstream
    /// assigns the id of a created resource, so the client's `id` is dropped first: it must not
    /// satisfy an `_id` criteria for a resource that will be stored under another id.
    pub fn check_create(&self, new: &mut Value) -> Result<(), WriteRefusal> {
        if let Some(obj) = new.as_object_mut() {
            obj.remove("id");
        }
        self.check_write(new, None)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::model::AccessPolicy;

    fn policy(resources: Value, compartment: Option<&str>) -> EffectivePolicy {
        let mut p = json!({"resourceType": "AccessPolicy", "resource": resources});
        if let Some(c) = compartment {
            p["compartment"] = json!({"reference": c});
        }
        let p: AccessPolicy = serde_json::from_value(p).expect("policy");
        EffectivePolicy::from_access_policy(p, false, false)
    }

    #[test]
    fn a_create_cannot_claim_an_id_and_is_stamped() {
        let pinned = policy(
            json!([{"resourceType": "Patient", "criteria": "Patient?_id=p1"}]),
            None,
        );
        let mut claimed = json!({"resourceType": "Patient", "id": "p1"});
        assert_eq!(
            pinned.check_create(&mut claimed),
            Err(WriteRefusal::CreateOutsideCriteria)
        );
        assert!(claimed.get("id").is_none());

        let org = policy(
            json!([{"resourceType": "Patient", "criteria": "Patient?_compartment=Organization/A",
                    "readonlyFields": ["identifier"]}]),
            Some("Organization/A"),
        );
        let mut new = json!({"resourceType": "Patient", "identifier": [{"value": "x"}],
                             "meta": {"account": {"reference": "Organization/B"}}});
        assert_eq!(org.check_create(&mut new), Ok(()));
        assert_eq!(new["meta"]["account"]["reference"], "Organization/A");
        assert!(
            new.get("identifier").is_none(),
            "readonly field dropped: {new}"
        );
    }

    #[test]
    fn an_update_is_judged_on_the_current_version_then_the_result() {
        let active_only = policy(
            json!([{"resourceType": "Task", "criteria": "Task?status=active",
                    "writeConstraint": [{"language": "text/fhirpath", "expression": "status.exists()"}]}]),
            None,
        );
        let current = json!({"resourceType": "Task", "id": "t", "status": "active"});
        let done = json!({"resourceType": "Task", "id": "t", "status": "completed"});
        let check = |new: &Value, cur: &Value| active_only.check_write(&mut new.clone(), Some(cur));
        assert_eq!(check(&current, &current), Ok(()));
        assert_eq!(
            check(&done, &current),
            Err(WriteRefusal::ResultOutsideCriteria)
        );
        assert_eq!(
            check(&current, &done),
            Err(WriteRefusal::CurrentOutsideCriteria)
        );
        let no_status = json!({"resourceType": "Task", "id": "t"});
        let constrained = policy(
            json!([{"resourceType": "Task",
                    "writeConstraint": [{"language": "text/fhirpath", "expression": "status.exists()"}]}]),
            None,
        );
        assert_eq!(
            constrained.check_write(&mut no_status.clone(), Some(&current)),
            Err(WriteRefusal::WriteConstraint)
        );
    }
}
