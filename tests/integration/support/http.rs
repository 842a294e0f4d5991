//! A node's HTTP endpoint seen from outside: plain GETs, and the metrics
//! exposition parsed into numbers a test can check.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::node::REPLY_TIMEOUT;

/// GETs `path` from `addr`: the status and the body.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let url = format!("http://{addr}{path}");
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into();
        let mut response = agent
            .get(&url)
            .call()
            .unwrap_or_else(|error| panic!("GET {url}: {error}"));
        let body = response.body_mut().read_to_string().unwrap();
        (response.status().as_u16(), body)
    })
    .await
    .unwrap()
}

/// Samples of an exposition: `name{label="value",...}` → value.
#[derive(Debug)]
pub struct Exposition {
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
    pub text: String,
}

impl Exposition {
    pub fn parse(text: &str) -> Exposition {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (key, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("a sample without a value: {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number in {line:?}"));
            let (name, labels) = match key.split_once('{') {
                Some((name, labels)) => {
                    let labels = labels.strip_suffix('}').expect("labels end with }");
                    let labels = labels
                        .split(',')
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (label, value) = pair.split_once('=').expect("label=value");
                            let value = value.trim_matches('"');
                            (label.to_owned(), value.to_owned())
                        })
                        .collect();
                    (name, labels)
                }
                None => (key, BTreeMap::new()),
            };
            samples.insert((name.to_owned(), labels), value);
        }
        Exposition {
            samples,
            text: text.to_owned(),
        }
    }

    /// The sample `name` with exactly `labels`, if there is one.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(label, value)| (label.to_string(), value.to_string()))
            .collect();
        self.samples.get(&(name.to_owned(), labels)).copied()
    }

    /// Every sample named `name`, with its labels.
    pub fn all(&self, name: &str) -> Vec<(&BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|((sample, _), _)| sample == name)
            .map(|((_, labels), value)| (labels, *value))
            .collect()
    }
}

/// Scrapes `/metrics` until `done` holds of it, and returns that scrape.
/// The node counts a request when the broker confirms its reply, which may
/// be just after the caller has it: a scrape right after a reply can be a
/// moment early, and only the endpoint can say when it is not.
pub async fn metrics_until(addr: SocketAddr, done: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
    loop {
        let (status, text) = get(addr, "/metrics").await;
        assert_eq!(status, 200, "{text}");
        let exposition = Exposition::parse(&text);
        if done(&exposition) {
            return exposition;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the metrics never showed what was expected:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asks `/readyz` until its status is `status`; returns the body then.
pub async fn readyz_until(addr: SocketAddr, status: u16, within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (now, body) = get(addr, "/readyz").await;
        if now == status {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz still says {now} ({}) after {within:?}",
            body.trim()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
