//! A tiny browser for fhirgate's sign-in page over plain HTTP: cookies kept, redirects not
//! followed, forms read from the HTML and posted back.

use std::collections::HashMap;

/// Cookies, and where the page's forms post.
pub struct Browser {
    pub cookies: HashMap<String, String>,
    /// The gateway's base URL (`http://127.0.0.1:PORT/`).
    base: String,
    /// The client's redirect URI: a redirect there is the answer to the client.
    redirect: String,
}

/// One answer of the gateway, as the browser saw it.
pub struct Page {
    pub status: u16,
    pub location: Option<String>,
    pub content_type: String,
    pub csp: Option<String>,
    pub body: String,
    redirect: String,
}

impl Page {
    /// The query of the redirect, when it goes to the client.
    pub fn redirect_params(&self) -> HashMap<String, String> {
        let location = self.location.as_deref().expect("a redirect");
        assert!(
            location.starts_with(&self.redirect),
            "redirect to {location}, not the client"
        );
        url::Url::parse(location)
            .unwrap()
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    pub fn hidden(&self) -> Vec<(String, String)> {
        inputs(&self.body, "hidden")
    }

    pub fn field(&self, name: &str) -> String {
        self.hidden()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no hidden {name} in {}", self.body))
            .1
    }

    pub fn alert(&self) -> Option<String> {
        let start = self.body.find(r#"role="alert""#)?;
        let text = &self.body[start..];
        let open = text.find('>')? + 1;
        let close = text.find("</p>")?;
        Some(unescape(&text[open..close]))
    }

    pub fn title(&self) -> String {
        let start = self.body.find("<h1 id=\"title\">").expect("a title") + 15;
        let end = self.body[start..].find("</h1>").unwrap() + start;
        unescape(&self.body[start..end])
    }

    /// The hidden fields of the form with this `id`.
    pub fn form(&self, id: &str) -> Vec<(String, String)> {
        let marker = format!(r#"id="{id}""#);
        let start = self
            .body
            .find(&marker)
            .unwrap_or_else(|| panic!("no form {id} in {}", self.body));
        let end = self.body[start..].find("</form>").expect("the form's end") + start;
        inputs(&self.body[start..end], "hidden")
    }
}

pub fn unescape(s: &str) -> String {
    s.replace("&#x2f;", "/")
        .replace("&#x27;", "'")
        .replace("&quot;", "\"")
        .replace("&#34;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// `(name, value)` of every `<input type="{kind}" …>`.
pub fn inputs(html: &str, kind: &str) -> Vec<(String, String)> {
    let attr = |tag: &str, name: &str| {
        let key = format!(" {name}=\"");
        let start = tag.find(&key)? + key.len();
        let end = tag[start..].find('"')? + start;
        Some(unescape(&tag[start..end]))
    };
    html.split("<input")
        .skip(1)
        .filter_map(|rest| {
            let tag = &rest[..rest.find('>')?];
            if attr(tag, "type")? != kind {
                return None;
            }
            Some((attr(tag, "name")?, attr(tag, "value")?))
        })
        .collect()
}

impl Browser {
    /// A browser on the gateway at `base`, signing in for a client whose redirect URI is
    /// `redirect`.
    pub fn new(base: &str, redirect: &str) -> Browser {
        Browser {
            cookies: HashMap::new(),
            base: base.to_string(),
            redirect: redirect.to_string(),
        }
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn read(&mut self, resp: reqwest::Response) -> Page {
        for c in resp.headers().get_all("set-cookie") {
            let c = c.to_str().unwrap();
            let pair = c.split(';').next().unwrap();
            let (k, v) = pair.split_once('=').unwrap();
            if c.contains("Max-Age=0") {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_string(), v.to_string());
            }
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        Page {
            status: resp.status().as_u16(),
            location: header("location"),
            content_type: header("content-type").unwrap_or_default(),
            csp: header("content-security-policy"),
            body: resp.text().await.unwrap(),
            redirect: self.redirect.clone(),
        }
    }

    pub async fn get(&mut self, url: &str) -> Page {
        let resp = Self::client()
            .get(url)
            .header("cookie", self.cookie_header())
            .send()
            .await
            .unwrap();
        self.read(resp).await
    }

    /// Posts `fields` to the page's own URL.
    pub async fn post(&mut self, fields: &[(String, String)]) -> Page {
        let resp = Self::client()
            .post(format!("{}oauth2/authorize", self.base))
            .header("cookie", self.cookie_header())
            .form(fields)
            .send()
            .await
            .unwrap();
        self.read(resp).await
    }

    /// Submits the form of `page`: its hidden fields plus `extra`.
    pub async fn submit(&mut self, page: &Page, extra: &[(&str, &str)]) -> Page {
        let mut fields = page.hidden();
        fields.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self.post(&fields).await
    }
}
