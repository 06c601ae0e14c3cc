//! Checks an endpoint list before anything is dialled: a typo in one endpoint must not take
//! down the others, and a list with nothing usable must say what is wrong with each entry.

use tonic::codegen::http::Uri;

use crate::Error;

/// The usable endpoints of `given`, each with its scheme; an entry that cannot work is left out
/// with a warning naming it and why.
///
/// # Errors
/// [`Error::Config`] when no entry is usable, listing every entry with its problem.
pub(super) fn usable<E: AsRef<str>>(
    given: impl IntoIterator<Item = E>,
    tls: bool,
) -> Result<Vec<String>, Error> {
    let mut usable = Vec::new();
    let mut refused = Vec::new();
    for entry in given {
        let entry = entry.as_ref();
        match check(entry, tls) {
            Ok(endpoint) => usable.push(endpoint),
            Err(why) => refused.push(format!("{entry:?}: {why}")),
        }
    }
    if usable.is_empty() {
        return Err(Error::Config(if refused.is_empty() {
            "no etcd endpoint given".to_owned()
        } else {
            format!("no usable etcd endpoint: {}", refused.join("; "))
        }));
    }
    for problem in &refused {
        tracing::warn!(endpoint = %problem, "leaving out an etcd endpoint that cannot work");
    }
    Ok(usable)
}

/// `entry` as a URL etcd-client accepts, or why it cannot work.
fn check(entry: &str, tls: bool) -> Result<String, String> {
    let entry = entry.trim();
    if entry.is_empty() {
        return Err("empty".into());
    }
    // etcd-client takes `host:port` alone too, with the scheme TLS implies.
    let url = if entry.contains("://") {
        entry.to_owned()
    } else {
        format!("{}://{entry}", if tls { "https" } else { "http" })
    };
    let uri: Uri = url.parse().map_err(|e| format!("not a URL ({e})"))?;
    let host = uri.host().unwrap_or("");
    if host.is_empty() {
        return Err("no host".into());
    }
    if uri.port().is_none() {
        return Err("no port (etcd's client port is usually 2379)".into());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("a path or query, which etcd endpoints do not have".into());
    }
    match uri.scheme_str() {
        Some("http") if tls => Err("http:// while TLS is configured: use https://".into()),
        Some("https") if !tls => Err(if cfg!(feature = "tls") {
            "https:// without TLS options: set EtcdOptions::tls with the cluster's CA".into()
        } else {
            "https:// needs etcd-registry's `tls` feature and EtcdOptions::tls".into()
        }),
        Some("http" | "https") => Ok(url),
        _ => Err("the scheme must be http:// or https://".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_is_left_out_and_the_rest_kept() {
        let got = usable(
            [
                "http://127.0.0.1:2379",
                "htp://127.0.0.1:2380",
                "127.0.0.1:2381",
                "http://127.0.0.1",
                "http://127.0.0.1:23 79",
                "http://127.0.0.1:2382/v3",
                "",
            ],
            false,
        )
        .expect("two usable endpoints");
        assert_eq!(got, ["http://127.0.0.1:2379", "http://127.0.0.1:2381"]);
    }

    #[test]
    fn a_list_with_nothing_usable_names_every_entry() {
        let error = usable(["htp://a:1", "http://127.0.0.1"], false).expect_err("nothing usable");
        let text = error.to_string();
        assert!(matches!(error, Error::Config(_)), "{error:?}");
        assert!(text.contains("\"htp://a:1\": the scheme"), "{text}");
        assert!(text.contains("\"http://127.0.0.1\": no port"), "{text}");
        let empty = usable(Vec::<String>::new(), false).expect_err("empty list");
        assert!(
            empty.to_string().contains("no etcd endpoint given"),
            "{empty}"
        );
    }

    #[test]
    fn the_scheme_must_match_tls() {
        let plain = usable(["https://127.0.0.1:2379"], false).expect_err("https without TLS");
        assert!(plain.to_string().contains("https://"), "{plain}");
        let tls = usable(["http://127.0.0.1:2379"], true).expect_err("http with TLS");
        assert!(tls.to_string().contains("use https://"), "{tls}");
        assert_eq!(
            usable(["127.0.0.1:2379"], true).expect("bare host:port"),
            ["https://127.0.0.1:2379"]
        );
    }
}
