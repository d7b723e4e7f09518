//! `DomainConfiguration`s (docs/medplum-compat.md §1.7): the lookup by e-mail domain, and the checks
//! before one is stored.

use crate::state::State;
use crate::store::StoredResource;
use serde_json::Value;

use crate::control::base::saml_idp::{SamlIdp, check_saml_idp};
use crate::control::web::error::ApiError;

/// The `DomainConfiguration` of `domain` (compared lower-case), as stored.
pub async fn domain_configuration(state: &State, domain: &str) -> Result<Option<Value>, ApiError> {
    let wanted = domain.to_lowercase();
    Ok(state
        .store
        .list("DomainConfiguration")
        .await?
        .into_iter()
        .map(|r| r.content)
        .find(|c| {
            c.get("domain")
                .and_then(Value::as_str)
                .is_some_and(|d| d.to_lowercase() == wanted)
        }))
}

/// The SAML IdP of an e-mail domain. A DomainConfiguration whose SAML settings do not hold is
/// no IdP (and is logged): nobody is signed in through it.
pub async fn domain_saml_idp(state: &State, domain: &str) -> Result<Option<SamlIdp>, ApiError> {
    let Some(config) = domain_configuration(state, domain).await? else {
        return Ok(None);
    };
    let Some(found) = config
        .get("identityProvider")
        .and_then(SamlIdp::of_identity_provider)
    else {
        return Ok(None);
    };
    Ok(found
        .map_err(|e| {
            tracing::error!(domain = %domain, error = %e, "the SAML identity provider of a domain is not usable");
        })
        .ok())
}

/// Whether any e-mail domain signs in through SAML (the page then offers single sign-on).
pub async fn any_saml_domain(state: &State) -> bool {
    match state.store.list("DomainConfiguration").await {
        Ok(all) => all
            .iter()
            .any(|c| c.content.pointer("/identityProvider/saml").is_some()),
        Err(_) => false,
    }
}

/// The fields an `IdentityProvider` must have (1..1 in Medplum's profile).
const IDP_REQUIRED: [&str; 5] = [
    "authorizeUrl",
    "tokenUrl",
    "userInfoUrl",
    "clientId",
    "clientSecret",
];

/// Validation of a `DomainConfiguration` before it is stored (the FHIR CRUD, `base::resources`):
/// `domain` is required, stored lower-case and unique; an `identityProvider` has its required
/// fields. It belongs to no project.
pub async fn prepare_domain_configuration(
    state: &State,
    resource: &mut Value,
    existing: Option<&StoredResource>,
) -> Result<Option<String>, ApiError> {
    let domain = resource
        .get("domain")
        .and_then(Value::as_str)
        .map(|d| d.trim().to_lowercase())
        .filter(|d| !d.is_empty())
        .ok_or_else(|| {
            ApiError::invalid("DomainConfiguration.domain", "Missing required property")
        })?;
    if domain
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || "@/\\?#".contains(c))
    {
        return Err(ApiError::invalid(
            "DomainConfiguration.domain",
            "Invalid domain",
        ));
    }
    if let Some(idp) = resource.get("identityProvider") {
        let Some(obj) = idp.as_object() else {
            return Err(ApiError::invalid(
                "DomainConfiguration.identityProvider",
                "Invalid identity provider",
            ));
        };
        // fhirgate's SAML IdP (`identityProvider.saml`) stands instead of the OIDC fields.
        check_saml_idp(resource, "DomainConfiguration.identityProvider.saml")?;
        for field in IDP_REQUIRED
            .into_iter()
            .filter(|_| !obj.contains_key("saml"))
        {
            if obj
                .get(field)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(ApiError::invalid(
                    &format!("DomainConfiguration.identityProvider.{field}"),
                    "Missing required property",
                ));
            }
        }
    }
    let own_id = resource
        .get("id")
        .and_then(Value::as_str)
        .or(existing.map(|e| e.id.as_str()))
        .unwrap_or_default()
        .to_string();
    let taken = state
        .store
        .list("DomainConfiguration")
        .await?
        .into_iter()
        .any(|r| {
            r.id != own_id
                && r.content
                    .get("domain")
                    .and_then(Value::as_str)
                    .is_some_and(|d| d.to_lowercase() == domain)
        });
    if taken {
        return Err(ApiError::conflict(format!(
            "Key (domain)=({domain}) already exists."
        )));
    }
    if let Some(obj) = resource.as_object_mut() {
        obj.insert("domain".into(), Value::String(domain));
    }
    Ok(None)
}
