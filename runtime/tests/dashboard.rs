//! The web dashboard in real headless Chromium (Debian packages `chromium`
//! and `chromium-driver`, installed by `scripts/test.sh`): the page of a
//! real node loads, lists a task this test submitted, shows it succeeded,
//! its detail page shows the subtasks, and a subtask's log opens under its
//! row with the lines the guest printed.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{http_get, Harness, CLUSTERS, CONFIG};
use stoker_proto::api::SubmitTaskRequest;

const CHROMIUM: &str = "/usr/bin/chromium";

/// The Chromium binary; the test fails (never skips) without it.
fn chromium() -> PathBuf {
    let path = PathBuf::from(std::env::var("STOKER_CHROMIUM").unwrap_or_else(|_| CHROMIUM.into()));
    assert!(
        path.exists(),
        "{} is missing: the dashboard test needs headless Chromium \
         (apt-get install -y chromium chromium-driver, which scripts/test.sh does), \
         or STOKER_CHROMIUM pointing at a Chromium binary",
        path.display()
    );
    path
}

/// The DOM of `url` after its scripts ran, from headless Chromium.
fn dump_dom(url: &str, profile: &std::path::Path) -> String {
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=15000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish loading {url} in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "chromium failed on {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The start tag of the first element with `attr`, e.g. `data-task-id="3"`.
fn tag_with<'a>(dom: &'a str, attr: &str) -> Option<&'a str> {
    let at = dom.find(attr)?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    Some(&dom[start..=end])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_lists_a_task_and_shows_it_succeed_in_headless_chromium() {
    chromium();
    let _serial = CLUSTERS.lock().await;
    let h = Harness::start(1, CONFIG).await;
    let addr = h.addr(1).to_string();
    let hash = h.upload("misbehave").await;
    let id = h
        .submit(SubmitTaskRequest {
            module: hash,
            key: "dashboard-test".into(),
            // Subtask 0/2 prints three lines to stdout.
            input: b"spin:1\nok\nlog:3\n".to_vec(),
            concurrency: 2,
            ..Default::default()
        })
        .await;
    let done = h.wait(id).await;
    assert_eq!(done.task.as_ref().unwrap().state, "succeed");

    // The page and its assets are served by the node itself.
    for (path, kind) in [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
    ] {
        let r = http_get(&addr, path, &[]);
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("content-type").unwrap_or("").starts_with(kind),
            "{path}: {:?}",
            r.headers
        );
    }

    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/");
    let dom = tokio::task::spawn_blocking({
        let (url, p) = (url.clone(), profile.path().to_path_buf());
        move || dump_dom(&url, &p)
    })
    .await
    .unwrap();
    let row = tag_with(&dom, &format!("data-task-id=\"{id}\""))
        .unwrap_or_else(|| panic!("task {id} is not listed on {url}:\n{dom}"));
    assert!(row.contains("data-state=\"succeed\""), "task row {row}");
    assert!(dom.contains("dashboard-test"), "the task's key is shown");
    assert!(
        tag_with(&dom, "data-node-id=\"1\"").is_some(),
        "node 1 is listed:\n{dom}"
    );
    assert!(
        dom.contains("Leader (owner): node 1"),
        "the leader is shown:\n{dom}"
    );
    assert!(
        dom.contains("No placement rules."),
        "the rules section is shown"
    );

    let url = format!("http://{addr}/#/task/{id}");
    let dom = tokio::task::spawn_blocking({
        let (url, p) = (url.clone(), profile.path().to_path_buf());
        move || dump_dom(&url, &p)
    })
    .await
    .unwrap();
    let state = tag_with(&dom, "id=\"task-state\"")
        .map(|tag| &dom[dom.find(tag).unwrap() + tag.len()..])
        .unwrap_or_else(|| panic!("no task state on {url}:\n{dom}"));
    assert!(
        state.starts_with("succeed<"),
        "{}",
        &state[..state.len().min(80)]
    );
    let subtask_rows = dom
        .matches("class=\"subtask\" data-state=\"succeed\"")
        .count();
    assert_eq!(
        subtask_rows,
        done.subtasks.len(),
        "every subtask is shown:\n{dom}"
    );
    // Each finished subtask offers its log; none is open yet.
    let links = dom.matches("class=\"log-link\"").count();
    assert_eq!(links, done.subtasks.len(), "a log link per subtask:\n{dom}");
    assert!(!dom.contains("id=\"subtask-log\""), "no log is open yet");
    let link = format!("href=\"#/task/{id}/log/0/2\"");
    assert!(dom.contains(&link), "subtask 0/2 links its log:\n{dom}");

    // Following the link (its address) opens the log under the row.
    let url = format!("http://{addr}/#/task/{id}/log/0/2");
    let dom = tokio::task::spawn_blocking({
        let (url, p) = (url.clone(), profile.path().to_path_buf());
        move || dump_dom(&url, &p)
    })
    .await
    .unwrap();
    let pre = tag_with(&dom, "id=\"subtask-log\"")
        .unwrap_or_else(|| panic!("no open log on {url}:\n{dom}"));
    assert!(
        pre.contains("data-step=\"0\"") && pre.contains("data-ordinal=\"2\""),
        "{pre}"
    );
    assert!(pre.contains("data-attempt=\"1\""), "{pre}");
    let text = &dom[dom.find(pre).unwrap() + pre.len()..];
    let text = &text[..text.find("</pre>").expect("the log ends")];
    assert_eq!(
        text, "log line 0 of 3\nlog line 1 of 3\nlog line 2 of 3\n",
        "the guest's stdout is shown"
    );
    assert!(dom.contains("hide log"), "the open log can be hidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_endpoints_refuse_bad_requests_with_a_reason() {
    let _serial = CLUSTERS.lock().await;
    let h = Harness::start(1, CONFIG).await;
    let addr = h.addr(1).to_string();
    let r = http_get(&addr, "/api/tasks/abc", &[]);
    assert_eq!(r.status, 400);
    assert!(r.body.contains("task id must be a number"), "{}", r.body);
    let r = http_get(&addr, "/api/tasks/999999", &[]);
    assert_eq!(r.status, 404);
    assert!(r.body.contains("task 999999 not found"), "{}", r.body);
    let r = http_get(&addr, "/api/overview", &[("Authorization", "Basic x")]);
    assert_eq!(r.status, 401);
    assert!(r.body.contains("Bearer"), "{}", r.body);
    let r = http_get(&addr, "/api/overview", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["leader_id"], 1);
    assert_eq!(v["nodes"][0]["id"], 1);
    let r = http_get(&addr, "/api/rules", &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "{\"rules\":[]}"));
    for (path, status, why) in [
        (
            "/api/tasks/1/subtasks/x/0/log",
            400,
            "step must be a number",
        ),
        (
            "/api/tasks/1/subtasks/0/0/log?attempt=z",
            400,
            "attempt must be a number",
        ),
        (
            "/api/tasks/999999/subtasks/0/0/log",
            404,
            "subtask 999999/0/0 not found",
        ),
    ] {
        let r = http_get(&addr, path, &[]);
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert!(r.body.contains(why), "{path}: {}", r.body);
    }
}
