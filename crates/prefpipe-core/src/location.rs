//! `--store` as written (DESIGN §13): a directory, or an object-store URL
//! (`s3://bucket/prefix`, `gs://…`, `az://…`; `file://…` is a directory).
//!
//! Object stores are built with the `object_store` crate DataFusion links,
//! configured from its standard environment variables (`AWS_*`, `GOOGLE_*`,
//! `AZURE_*`). Credentials are checked to be *present* before anything is
//! sent: without them `object_store` would fall back to a cloud metadata
//! endpoint, which is network the pipeline never named (opt in with
//! `PREFPIPE_CLOUD_METADATA=1` on a VM or pod whose identity is the
//! credential). No secret ever enters a message: [`scrub`] removes them.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::ObjectStore;

use crate::error::{Error, Result};

/// Where a run store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A directory (a path, or a `file://` URL).
    Local(PathBuf),
    /// A bucket and key prefix on an object store.
    Object(ObjectUrl),
}

/// The object stores `--store` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    S3,
    Gcs,
    Azure,
}

/// An object-store URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUrl {
    pub cloud: Cloud,
    /// Bucket (S3, GCS) or container (Azure).
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (`""`: the bucket's root).
    pub prefix: String,
    /// `scheme://bucket` as given (user info, query and fragment removed): the
    /// builders read it, and DataFusion registers the store under it.
    pub base: String,
}

impl ObjectUrl {
    /// `scheme://bucket/prefix` for messages.
    pub fn display(&self) -> String {
        if self.prefix.is_empty() {
            self.base.clone()
        } else {
            format!("{}/{}", self.base, self.prefix)
        }
    }
    /// The URL of `rel` (a `/`-separated path inside the store).
    pub fn url_of(&self, rel: &str) -> String {
        format!("{}/{}", self.display().trim_end_matches('/'), rel)
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Local(p) => write!(f, "{}", p.display()),
            StoreLocation::Object(u) => write!(f, "{}", u.display()),
        }
    }
}

impl StoreLocation {
    /// Parses `--store`: a URL when it has a `scheme://`, else a path.
    pub fn parse(s: &str) -> Result<StoreLocation> {
        let Some((scheme, _)) = s.split_once("://") else {
            return Ok(StoreLocation::Local(PathBuf::from(s)));
        };
        let shown = crate::remote::redact_url(s);
        let bad = |why: &str| Error::Input(format!("--store {shown}: {why}"));
        let scheme_lc = scheme.to_ascii_lowercase();
        let cloud = match scheme_lc.as_str() {
            "file" => None,
            "s3" | "s3a" => Some(Cloud::S3),
            "gs" => Some(Cloud::Gcs),
            "az" | "azure" | "abfs" | "abfss" | "adl" => Some(Cloud::Azure),
            _ => return Err(bad(&format!("unknown URL scheme `{scheme}://`; give a directory or an s3://, gs://, az:// or file:// URL"))),
        };
        let url = url::Url::parse(s).map_err(|e| bad(&format!("not a valid URL ({e})")))?;
        let Some(cloud) = cloud else {
            if url.host_str().is_some_and(|h| !h.is_empty() && h != "localhost") {
                return Err(bad("a file:// URL names a local directory: file:///absolute/path"));
            }
            let path = url.to_file_path().map_err(|_| bad("a file:// URL names a local directory: file:///absolute/path"))?;
            return Ok(StoreLocation::Local(path));
        };
        let host = url.host_str().unwrap_or_default();
        if host.is_empty() {
            return Err(bad("the URL names no bucket (scheme://bucket/prefix)"));
        }
        // Azure also takes `abfss://container@account.dfs.core.windows.net/…`.
        let bucket = if cloud == Cloud::Azure && !url.username().is_empty() { url.username().to_string() } else { host.to_string() };
        let base = if cloud == Cloud::Azure && !url.username().is_empty() {
            format!("{}://{}@{host}", url.scheme(), url.username())
        } else {
            format!("{}://{host}", url.scheme())
        };
        let prefix = url.path().trim_matches('/').to_string();
        Ok(StoreLocation::Object(ObjectUrl { cloud, bucket, prefix, base }))
    }
}

/// Whether a variable is set to something.
fn set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

fn truthy(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Credentials for `u` are configured (by variable or key file); otherwise
/// the error says which variables to set.
fn check_credentials(u: &ObjectUrl) -> Result<()> {
    let metadata = truthy("PREFPIPE_CLOUD_METADATA");
    let (ok, hint) = match u.cloud {
        Cloud::S3 => (
            (set("AWS_ACCESS_KEY_ID") && set("AWS_SECRET_ACCESS_KEY"))
                || set("AWS_WEB_IDENTITY_TOKEN_FILE")
                || set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
                || set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
                || set("AWS_METADATA_ENDPOINT")
                || truthy("AWS_SKIP_SIGNATURE")
                || metadata,
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN, or PREFPIPE_CLOUD_METADATA=1 for an instance profile)",
        ),
        Cloud::Gcs => {
            let adc = std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".config/gcloud/application_default_credentials.json").is_file())
                .unwrap_or(false);
            (
                set("GOOGLE_SERVICE_ACCOUNT")
                    || set("GOOGLE_SERVICE_ACCOUNT_PATH")
                    || set("GOOGLE_SERVICE_ACCOUNT_KEY")
                    || set("GOOGLE_APPLICATION_CREDENTIALS")
                    || set("SERVICE_ACCOUNT")
                    || truthy("GOOGLE_SKIP_SIGNATURE")
                    || adc
                    || metadata,
                "set GOOGLE_APPLICATION_CREDENTIALS or GOOGLE_SERVICE_ACCOUNT (a key file), or PREFPIPE_CLOUD_METADATA=1 for workload identity",
            )
        }
        Cloud::Azure => (
            truthy("AZURE_STORAGE_USE_EMULATOR")
                || truthy("AZURE_USE_EMULATOR")
                || truthy("AZURE_SKIP_SIGNATURE")
                || truthy("AZURE_USE_AZURE_CLI")
                || ((set("AZURE_STORAGE_ACCOUNT_NAME") || u.base.contains('@'))
                    && (set("AZURE_STORAGE_ACCOUNT_KEY")
                        || set("AZURE_STORAGE_ACCESS_KEY")
                        || set("AZURE_STORAGE_MASTER_KEY")
                        || set("AZURE_STORAGE_SAS_KEY")
                        || set("AZURE_STORAGE_SAS_TOKEN")
                        || set("AZURE_STORAGE_TOKEN")
                        || (set("AZURE_CLIENT_ID") || set("AZURE_STORAGE_CLIENT_ID"))
                            && (set("AZURE_CLIENT_SECRET") || set("AZURE_STORAGE_CLIENT_SECRET") || set("AZURE_FEDERATED_TOKEN_FILE"))
                        || metadata)),
            "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_TOKEN, or AZURE_CLIENT_ID + AZURE_CLIENT_SECRET + AZURE_TENANT_ID, or PREFPIPE_CLOUD_METADATA=1 for a managed identity)",
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::Input(format!("--store {}: no credentials: {hint}", u.display())))
    }
}

/// Builds the bucket's store from the environment (no request is sent).
pub fn build(u: &ObjectUrl) -> Result<Arc<dyn ObjectStore>> {
    check_credentials(u)?;
    let bad = |e: object_store::Error| Error::Input(format!("--store {}: {}", u.display(), one_line(&e.to_string())));
    let store: Arc<dyn ObjectStore> = match u.cloud {
        Cloud::S3 => Arc::new(object_store::aws::AmazonS3Builder::from_env().with_url(&u.base).build().map_err(bad)?),
        Cloud::Gcs => Arc::new(object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(&u.base).build().map_err(bad)?),
        Cloud::Azure => Arc::new(object_store::azure::MicrosoftAzureBuilder::from_env().with_url(&u.base).build().map_err(bad)?),
    };
    Ok(store)
}

/// What went wrong talking to the store, classified: a bucket that does not
/// exist and refused credentials are the user's input (exit 2), anything else
/// a run-time failure (exit 1). `what` names the object or operation.
pub fn store_error(u: &ObjectUrl, what: &str, e: &object_store::Error) -> Error {
    let text = e.to_string();
    let msg = one_line(&text);
    let code = xml_field(&text, "Code");
    let has = |s: &str| text.contains(s);
    if has("NoSuchBucket") || has("ContainerNotFound") || has("The specified bucket does not exist") {
        return Error::Input(format!("--store {}: the bucket `{}` does not exist", u.display(), u.bucket));
    }
    if has("InvalidAccessKeyId")
        || has("SignatureDoesNotMatch")
        || has("AccessDenied")
        || has("AuthenticationFailed")
        || has("status 401")
        || has("status 403")
    {
        let why = code.unwrap_or_else(|| "access denied".into());
        return Error::Input(format!("--store {}: the store refused the credentials ({why}); check them", u.display()));
    }
    Error::Runtime(format!("{}: {what}: {msg}", u.display()))
}

/// `<Tag>value</Tag>` inside an error body, if any.
fn xml_field(s: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let i = s.find(&open)? + open.len();
    let j = s[i..].find("</")? + i;
    Some(s[i..j].to_string())
}

/// The first line, without XML bodies, secrets or URL query strings.
pub fn one_line(s: &str) -> String {
    let first = s.lines().next().unwrap_or(s);
    let cut = first.find("<?xml").map_or(first, |i| &first[..i]).trim_end_matches([':', ' ']);
    let mut out = scrub(cut);
    if out.len() > 300 {
        let mut n = 300;
        while !out.is_char_boundary(n) {
            n -= 1;
        }
        out.truncate(n);
        out.push('…');
    }
    out
}

/// Removes secrets from a message: the values of credential variables
/// (`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AZURE_STORAGE_ACCOUNT_KEY`,
/// SAS tokens, …) and the query string of any URL (presigned signatures, SAS).
pub fn scrub(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    // URL query strings: from `?` to the next whitespace or quote, in a token with `://`.
    let mut rest = s;
    while let Some(q) = rest.find('?') {
        let token_start = rest[..q].rfind(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '(').map_or(0, |i| i + 1);
        let is_url = rest[token_start..q].contains("://");
        out.push_str(&rest[..q]);
        let end = rest[q..].find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == ')').map_or(rest.len(), |i| q + i);
        if is_url {
            out.push_str("?…");
        } else {
            out.push_str(&rest[q..end]);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    for (k, v) in std::env::vars() {
        let secret = (k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_"))
            && ["SECRET", "KEY", "TOKEN", "PASSWORD", "SAS"].iter().any(|w| k.contains(w))
            && !k.ends_with("_FILE")
            && !k.ends_with("_PATH");
        if secret && v.len() >= 4 {
            out = out.replace(&v, "***");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> ObjectUrl {
        match StoreLocation::parse(s).unwrap() {
            StoreLocation::Object(u) => u,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn paths_and_urls_parse() {
        assert_eq!(StoreLocation::parse(".prefpipe").unwrap(), StoreLocation::Local(".prefpipe".into()));
        assert_eq!(StoreLocation::parse("file:///tmp/x").unwrap(), StoreLocation::Local("/tmp/x".into()));
        let u = obj("s3://bkt/runs/a/");
        assert_eq!((u.cloud, u.bucket.as_str(), u.prefix.as_str(), u.base.as_str()), (Cloud::S3, "bkt", "runs/a", "s3://bkt"));
        assert_eq!(u.url_of("run.json"), "s3://bkt/runs/a/run.json");
        assert_eq!(obj("gs://b").prefix, "");
        assert_eq!(obj("gs://b").url_of("x"), "gs://b/x");
        let a = obj("abfss://cont@acct.dfs.core.windows.net/p");
        assert_eq!((a.cloud, a.bucket.as_str()), (Cloud::Azure, "cont"));
    }

    #[test]
    fn bad_urls_are_input_errors() {
        let e = StoreLocation::parse("ftp://u:hunter2@host/x").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("unknown URL scheme `ftp://`"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(StoreLocation::parse("s3:///nobucket").unwrap_err().to_string().contains("no bucket"));
        assert!(StoreLocation::parse("file://host/x").is_err());
        // URL parsing resolves dot segments, as any client would.
        assert_eq!(obj("s3://b/a/../c").prefix, "c");
    }

    #[test]
    fn scrub_removes_query_strings() {
        let s = scrub("GET https://a.blob.core.windows.net/c/x?sv=1&sig=SECRET failed; what? yes");
        assert_eq!(s, "GET https://a.blob.core.windows.net/c/x?… failed; what? yes");
        assert_eq!(one_line("Generic S3 error: boom: <?xml version=\"1.0\"?><Error/>\nmore"), "Generic S3 error: boom");
        assert_eq!(xml_field("<Error><Code>NoSuchBucket</Code></Error>", "Code").as_deref(), Some("NoSuchBucket"));
    }
}
