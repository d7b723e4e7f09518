//! The upstreams a Project can be bound to: the global `upstream` (`default`) and the operator's
//! named ones (`upstreams`), each with its own credentials and its host resolved off the
//! request path (`ControlTarget`). Which project uses which is a super-admin decision, read from
//! the Project into the snapshot (`ProjectInfo::upstream`).

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, ControlUrl, DEFAULT_UPSTREAM, Upstream};

use super::control::ControlTarget;

#[derive(Debug)]
pub struct UpstreamBinding {
    pub name: String,
    pub upstream: Upstream,
    pub target: Arc<ControlTarget>,
    /// `upstream.host_header` as the value the gateway sends, prepared once.
    pub host_header: http::HeaderValue,
}

impl UpstreamBinding {
    fn new(name: &str, upstream: &Upstream) -> Arc<UpstreamBinding> {
        let target = ControlTarget::new(ControlUrl {
            url: upstream.base_url.clone(),
            tls: upstream.tls,
            host: upstream.host.clone(),
            port: upstream.port,
        });
        Arc::new(UpstreamBinding {
            name: name.to_string(),
            host_header: http::HeaderValue::from_str(&upstream.host_header)
                .expect("a parsed URL's host and port are header-safe"),
            upstream: upstream.clone(),
            target: Arc::new(target),
        })
    }
}

#[derive(Debug)]
pub struct Upstreams {
    default: Arc<UpstreamBinding>,
    named: HashMap<String, Arc<UpstreamBinding>>,
}

impl Upstreams {
    pub fn from_config(config: &Config) -> Upstreams {
        Upstreams {
            default: UpstreamBinding::new(DEFAULT_UPSTREAM, &config.upstream),
            named: config
                .named_upstreams
                .iter()
                .map(|(name, up)| (name.clone(), UpstreamBinding::new(name, up)))
                .collect(),
        }
    }

    pub fn default_binding(&self) -> &Arc<UpstreamBinding> {
        &self.default
    }

    /// The binding called `name` (`default` is the global upstream); `None` for a name the
    /// operator has not configured.
    pub fn get(&self, name: &str) -> Option<&Arc<UpstreamBinding>> {
        if name == DEFAULT_UPSTREAM {
            Some(&self.default)
        } else {
            self.named.get(name)
        }
    }

    pub fn is_known(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Every binding's address target, the default first.
    pub fn targets(&self) -> Vec<Arc<ControlTarget>> {
        std::iter::once(&self.default)
            .chain(self.named.values())
            .map(|b| b.target.clone())
            .collect()
    }
}
