//! Config tests: each rule, every problem at once, `[admin_api]`,
//! `[metrics]`, owners, and entries from the admin API.

use super::entry::is_dns_name;
use super::*;
use crate::policy::{BeginRate, TaskPolicy};

fn parse(text: &str) -> Result<Config, Error> {
    Config::parse(text, "test.toml", &Overrides::default())
}

const GOOD: &str = r#"
    trust_domain = "agents.example.org"
    state_dir = "/var/lib/sigil"
    [workload_api]
    socket = "/run/sigil/workload.sock"
    [svid]
    instance_ttl = "1h"
    task_ttl = "5m"
    [[entry]]
    name = "research-bot"
    selectors = ["unix:uid:1000", "unix:path:/usr/bin/python3"]
"#;

#[test]
fn the_issue_example_config_is_accepted() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.trust_domain.as_str(), "agents.example.org");
    assert_eq!(c.instance_ttl, Duration::from_secs(3600));
    assert_eq!(c.entries[0].selectors.len(), 2);
}

#[test]
fn the_shipped_example_and_the_defaults_are_valid() {
    let example = include_str!("../../config/sigil.toml");
    assert_eq!(parse(example).unwrap().entries.len(), 2);
    let defaults = Config::load(None, &Overrides::default()).unwrap();
    assert_eq!(defaults.trust_domain.as_str(), "sigil.local");
    let uid = nix::unistd::geteuid().to_string();
    assert_eq!(defaults.entries[0].selectors[0].value(), uid);
    assert_eq!(defaults.source, EMBEDDED);
}

#[test]
fn flags_override_the_file() {
    let overrides = Overrides {
        socket: Some("/tmp/x.sock".into()),
        state_dir: Some("/tmp/st".into()),
        admin_socket: Some("/tmp/a.sock".into()),
    };
    let c = Config::parse(GOOD, "f", &overrides).unwrap();
    assert_eq!(c.workload_socket, PathBuf::from("/tmp/x.sock"));
    assert_eq!(c.state_dir, PathBuf::from("/tmp/st"));
    assert_eq!(c.admin.socket, PathBuf::from("/tmp/a.sock"));
}

fn error_of(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn each_kind_of_mistake_names_the_file_and_the_field() {
    let cases = [
        (
            GOOD.replace(
                "trust_domain = \"agents.example.org\"",
                "trust_domain = \"Bad Domain\"",
            ),
            "trust_domain",
        ),
        (
            GOOD.replace("instance_ttl = \"1h\"", "instance_ttl = \"soon\""),
            "svid.instance_ttl",
        ),
        (
            GOOD.replace("instance_ttl = \"1h\"", "instance_ttl = \"100d\""),
            "out of range",
        ),
        (
            GOOD.replace("unix:uid:1000", "unix:uid:bob"),
            "entry \"research-bot\".selectors[0]",
        ),
        (
            GOOD.replace("unix:uid:1000", "unix:pid:1"),
            "unknown selector",
        ),
        (
            GOOD.replace("name = \"research-bot\"", "name = \"research bot\""),
            "entry[0].name",
        ),
        (
            GOOD.replace(
                "selectors = [\"unix:uid:1000\", \"unix:path:/usr/bin/python3\"]",
                "selectors = []",
            ),
            "admit every process",
        ),
        (
            format!("{GOOD}spiffe_id = \"spiffe://other.org/x\""),
            "outside the trust domain",
        ),
        (
            format!("{GOOD}spiffe_id = \"spiffe://{{trust_domain}}/{{pid}}\""),
            "unknown placeholder",
        ),
        (
            format!("{GOOD}dns_names = [\"not a name\"]"),
            "dns_names[0]",
        ),
        (format!("{GOOD}colour = \"blue\""), "unknown field"),
        (
            GOOD.replace(
                "socket = \"/run/sigil/workload.sock\"",
                "socket = \"relative.sock\"",
            ),
            "workload_api.socket",
        ),
        (
            format!("{GOOD}[[entry]]\nname = \"research-bot\"\nselectors = [\"unix:uid:1\"]"),
            "unique",
        ),
        ("trust_domain = [".to_owned(), "test.toml"),
        ("trust_domain = \"a.org\"".to_owned(), "no [[entry]]"),
        (
            format!("{GOOD}[entry.tasks]\nmax_ttl = \"1y\""),
            "tasks.max_ttl",
        ),
        (
            format!("{GOOD}[entry.tasks]\nmax_concurrent = 0"),
            "tasks.max_concurrent",
        ),
        (
            format!("{GOOD}[entry.tasks]\nid_pattern = \"[\""),
            "tasks.id_pattern",
        ),
        (
            format!("{GOOD}[entry.tasks]\nself_declare = \"yes\""),
            "self_declare",
        ),
        (
            format!("{GOOD}[entry.tasks]\nbegin_burst = 0"),
            "entry \"research-bot\".tasks.begin_burst: 0 is out of range",
        ),
        (
            format!("{GOOD}[entry.tasks]\nbegin_burst = 5000"),
            "tasks.begin_burst",
        ),
        (
            format!("{GOOD}[entry.tasks]\nbegin_per_second = 0.0"),
            "entry \"research-bot\".tasks.begin_per_second: 0 is out of range",
        ),
        (
            format!("{GOOD}[entry.tasks]\nbegin_per_second = -2"),
            "tasks.begin_per_second",
        ),
        (
            format!("{GOOD}[entry.tasks]\nbegin_per_second = nan"),
            "tasks.begin_per_second",
        ),
        (
            format!("{GOOD}[entry.tasks]\nbegin_per_second = \"fast\""),
            "begin_per_second",
        ),
    ];
    for (text, expected) in cases {
        let err = error_of(&text);
        assert!(err.starts_with("test.toml"), "no file name in {err:?}");
        assert!(err.contains(expected), "{expected:?} not in {err:?}");
    }
}

#[test]
fn entry_task_policy_is_read_with_defaults() {
    let c = parse(&format!(
        "{GOOD}[entry.tasks]\nself_declare = true\nmax_ttl = \"10m\"\nid_pattern = \"ticket-*\""
    ))
    .unwrap();
    let tasks = &c.entries[0].tasks;
    assert!(tasks.self_declare);
    assert_eq!(tasks.max_ttl, Duration::from_secs(600));
    assert_eq!(tasks.max_concurrent, TaskPolicy::default().max_concurrent);
    assert!(tasks.id_pattern.as_ref().unwrap().matches("ticket-9"));
    assert!(!parse(GOOD).unwrap().entries[0].tasks.self_declare);
}

#[test]
fn entry_begin_rate_is_read_with_defaults() {
    let c = parse(&format!(
        "{GOOD}[entry.tasks]\nbegin_burst = 5\nbegin_per_second = 4"
    ))
    .unwrap();
    let rate = c.entries[0].tasks.begin_rate;
    assert_eq!(rate.burst, 5);
    assert_eq!(rate.every, Duration::from_millis(250));
    let c = parse(&format!("{GOOD}[entry.tasks]\nbegin_per_second = 0.5")).unwrap();
    assert_eq!(c.entries[0].tasks.begin_rate.every, Duration::from_secs(2));
    assert_eq!(
        c.entries[0].tasks.begin_rate.burst,
        crate::policy::rate::DEFAULT_BEGIN_BURST
    );
    assert_eq!(
        parse(GOOD).unwrap().entries[0].tasks.begin_rate,
        BeginRate::default()
    );
}

#[test]
fn a_missing_file_is_named() {
    let err = Config::load(
        Some(Path::new("/nonexistent/sigil.toml")),
        &Overrides::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/sigil.toml"));
}

#[test]
fn dns_names_are_checked() {
    assert!(is_dns_name("mcp.internal"));
    assert!(is_dns_name("*.agents.example.org"));
    assert!(!is_dns_name("a..b"));
    assert!(!is_dns_name("-a.b"));
    assert!(!is_dns_name("a.*.b"));
}

#[test]
fn a_file_with_three_mistakes_in_two_entries_reports_all_three() {
    let text = r#"
        trust_domain = "agents.example.org"
        [[entry]]
        name = "research-bot"
        selectors = ["unix:uid:bob"]
        ttl = "forever"
        [[entry]]
        name = "mcp-server"
        selectors = ["systemd:unit:mcp.service"]
        dns_names = ["not a name"]
    "#;
    let err = parse(text).unwrap_err();
    let problems = err.problems();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems[0].starts_with("test.toml: entry \"research-bot\".selectors[0]: "));
    assert!(problems[1].starts_with("test.toml: entry \"research-bot\".ttl: "));
    assert!(problems[2].starts_with("test.toml: entry \"mcp-server\".dns_names[0]: "));
    assert_eq!(err.to_string(), problems.join("\n"), "one problem per line");
    let fields: Vec<_> = err.invalid().iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "entry \"research-bot\".selectors[0]",
            "entry \"research-bot\".ttl",
            "entry \"mcp-server\".dns_names[0]"
        ]
    );
}

#[test]
fn mistakes_in_different_sections_are_all_reported() {
    let text = r#"
        trust_domain = "Bad Domain"
        [workload_api]
        socket = "relative.sock"
        max_connections_per_uid = 0
        [metrics]
        listen = "localhost"
        [svid]
        task_ttl = "1s"
        [[entry]]
        name = "bad name"
        selectors = []
        spiffe_id = "spiffe://{trust_domain}/{pid}"
    "#;
    let fields: Vec<String> = parse(text)
        .unwrap_err()
        .invalid()
        .iter()
        .map(|p| p.field.clone())
        .collect();
    assert_eq!(
        fields,
        [
            "trust_domain",
            "workload_api.socket",
            "workload_api.max_connections_per_uid",
            "metrics.listen",
            "svid.task_ttl",
            "entry[0].name",
            "entry[0].selectors",
            "entry[0].spiffe_id",
        ]
    );
}

#[test]
fn a_parse_error_comes_alone_with_no_problem_list() {
    let err = parse("trust_domain = [").unwrap_err();
    assert!(matches!(err, Error::Parse { .. }));
    assert_eq!(err.problems(), [err.to_string()]);
    assert!(err.invalid().is_empty());
}

#[test]
fn the_admin_socket_defaults_to_admin_sock_beside_the_workload_socket() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.admin.socket, PathBuf::from("/run/sigil/admin.sock"));
    assert_eq!(c.admin.group, None);
    assert!(c.admin.allowed_uids.is_empty());
    let moved = Overrides {
        socket: Some("/tmp/elsewhere/w.sock".into()),
        ..Overrides::default()
    };
    let c = Config::parse(GOOD, "f", &moved).unwrap();
    assert_eq!(c.admin.socket, PathBuf::from("/tmp/elsewhere/admin.sock"));
    let defaults = Config::load(None, &Overrides::default()).unwrap();
    assert_eq!(defaults.admin.socket, default_admin_socket());
    assert_eq!(
        default_admin_socket().parent(),
        default_paths().1.parent(),
        "beside the default workload socket"
    );
}

#[test]
fn admin_api_keys_are_read_and_the_group_resolved() {
    let gid = nix::unistd::getegid();
    let Some(group) = nix::unistd::Group::from_gid(gid).unwrap() else {
        eprintln!("the test's gid {gid} has no name: skipped");
        return;
    };
    let text = format!(
        "{GOOD}[admin_api]\nsocket = \"/run/sigil/ops.sock\"\ngroup = \"{}\"\nallowed_uids = [0, 1001]\n",
        group.name
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.admin.socket, PathBuf::from("/run/sigil/ops.sock"));
    assert_eq!(
        c.admin.group,
        Some(AdminGroup {
            name: group.name.clone(),
            gid: gid.as_raw()
        })
    );
    assert_eq!(c.admin.allowed_uids, [0, 1001]);
    let flag = Overrides {
        admin_socket: Some("/tmp/flag.sock".into()),
        ..Overrides::default()
    };
    let c = Config::parse(&text, "f", &flag).unwrap();
    assert_eq!(
        c.admin.socket,
        PathBuf::from("/tmp/flag.sock"),
        "the flag wins"
    );
}

#[test]
fn each_admin_api_mistake_names_its_field() {
    let long = format!("/{}", "a".repeat(120));
    let cases = [
        (
            "socket = \"/run/sigil/workload.sock\"".to_owned(),
            "admin_api.socket: /run/sigil/workload.sock is the workload socket too",
        ),
        (
            "socket = \"admin.sock\"".to_owned(),
            "admin_api.socket: admin.sock is not an absolute path",
        ),
        (format!("socket = \"{long}\""), "admin_api.socket"),
        (
            "group = \"no-such-group-sigil\"".to_owned(),
            "admin_api.group: there is no group \"no-such-group-sigil\"",
        ),
        ("group = \"\"".to_owned(), "admin_api.group: is empty"),
        ("allowed_uids = [-1]".to_owned(), "allowed_uids"),
        ("colour = \"red\"".to_owned(), "unknown field"),
    ];
    for (line, expected) in cases {
        let err = error_of(&format!("{GOOD}[admin_api]\n{line}\n"));
        assert!(err.starts_with("test.toml"), "no file name in {err:?}");
        assert!(err.contains(expected), "{expected:?} not in {err:?}");
    }
    let long_workload = Overrides {
        socket: Some(format!("/{}/w", "d".repeat(100)).into()),
        ..Overrides::default()
    };
    let err = Config::parse(GOOD, "f", &long_workload)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admin_api.socket") && err.contains("the default"),
        "{err}"
    );
}

#[test]
fn metrics_are_off_unless_an_address_is_given() {
    assert_eq!(parse(GOOD).unwrap().metrics_listen, None);
    assert_eq!(
        parse(&format!("{GOOD}[metrics]\n")).unwrap().metrics_listen,
        None
    );
    let c = parse(&format!("{GOOD}[metrics]\nlisten = \"127.0.0.1:9464\"\n")).unwrap();
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
    let c = parse(&format!("{GOOD}[metrics]\nlisten = \"[::1]:9464\"\n")).unwrap();
    assert_eq!(c.metrics_listen, Some("[::1]:9464".parse().unwrap()));
    for bad in ["localhost:9464", "127.0.0.1", "9464"] {
        let err = error_of(&format!("{GOOD}[metrics]\nlisten = \"{bad}\"\n"));
        assert!(
            err.starts_with("test.toml: metrics.listen: "),
            "{bad}: {err}"
        );
    }
}

#[test]
fn an_owner_is_kept_when_printable_and_short() {
    let c = parse(&format!("{GOOD}owner = \"team-research (Ada)\"\n")).unwrap();
    assert_eq!(c.entries[0].owner.as_deref(), Some("team-research (Ada)"));
    assert_eq!(parse(GOOD).unwrap().entries[0].owner, None);
    let cases = [
        ("\"\"".to_owned(), "is empty"),
        ("\"  \"".to_owned(), "is empty"),
        (format!("\"{}\"", "x".repeat(129)), "129 bytes"),
        ("\"team\\u0007\"".to_owned(), "control character"),
        ("\"a\\nb\"".to_owned(), "control character"),
    ];
    for (value, expected) in cases {
        let err = error_of(&format!("{GOOD}owner = {value}\n"));
        assert!(
            err.contains("entry \"research-bot\".owner: ") && err.contains(expected),
            "{value}: {err}"
        );
    }
    assert!(parse(&format!("{GOOD}owner = \"{}\"\n", "é".repeat(64))).is_ok());
}

fn spec(json: &str) -> EntrySpec {
    serde_json::from_str(json).unwrap()
}

#[test]
fn an_admin_api_entry_is_checked_by_the_config_rules() {
    let td = TrustDomain::new("agents.example.org").unwrap();
    let good = spec(r#"{"name": "bot", "owner": "ops", "selectors": ["unix:uid:1000"]}"#);
    let entry = validate_entry(&good, &td).unwrap();
    assert_eq!(entry.name, "bot");
    assert_eq!(entry.owner.as_deref(), Some("ops"));
    assert_eq!(entry.tasks, TaskPolicy::default());

    let bad = spec(
        r#"{"name": "bot", "selectors": ["unix:uid:1000", "unix:uid:bob"],
            "spiffe_id": "spiffe://other.org/x", "tasks": {"max_concurrent": 0}}"#,
    );
    let err = validate_entry(&bad, &td).unwrap_err();
    let problems = err.problems();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems[0].starts_with("admin API: entry \"bot\".selectors[1]: "));
    assert!(problems[1].starts_with("admin API: entry \"bot\".spiffe_id: "));
    assert!(problems[2].starts_with("admin API: entry \"bot\".tasks.max_concurrent: "));

    // The same mistake gives the same message from a file.
    let from_file = error_of(&GOOD.replace("unix:uid:1000", "unix:uid:bob"));
    let from_api = validate_entry(
        &spec(r#"{"name": "research-bot", "selectors": ["unix:uid:bob"]}"#),
        &td,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        from_file.strip_prefix("test.toml: "),
        from_api.strip_prefix("admin API: ")
    );

    let unnamed = validate_entry(&spec(r#"{"name": "a b", "selectors": []}"#), &td)
        .unwrap_err()
        .problems();
    assert!(
        unnamed[0].starts_with("admin API: entry.name: "),
        "{unnamed:?}"
    );
    assert!(
        unnamed[1].starts_with("admin API: entry.selectors: "),
        "{unnamed:?}"
    );
    assert!(
        serde_json::from_str::<EntrySpec>(r#"{"name": "b", "selectors": [], "colour": 1}"#)
            .is_err(),
        "unknown fields are refused"
    );
}

#[test]
fn an_entry_written_back_as_a_spec_validates_to_the_same_entry() {
    let td = TrustDomain::new("agents.example.org").unwrap();
    let full = spec(
        r#"{"name": "bot", "owner": "team-a", "selectors": ["unix:uid:1000", "unix:sha256:AB"],
            "spiffe_id": "spiffe://{trust_domain}/team-a/{entry}/{instance}",
            "ttl": "90m", "dns_names": ["bot.internal", "*.bots.internal"],
            "tasks": {"self_declare": true, "max_ttl": "10m", "max_concurrent": 3,
                      "id_pattern": "ticket-*", "begin_burst": 7, "begin_per_second": 3.0}}"#
            .replace("AB", &"ab".repeat(32))
            .as_str(),
    );
    let minimal = spec(r#"{"name": "min", "selectors": ["unix:uid:1"]}"#);
    let mut rates = vec![full.clone()];
    for per_second in [0.7, 7.3, 0.001, 1000.0, 0.3] {
        let mut s = full.clone();
        if let Some(t) = s.tasks.as_mut() {
            t.begin_per_second = Some(per_second);
        }
        rates.push(s);
    }
    for original in rates.iter().chain([&minimal]) {
        let entry = validate_entry(original, &td).unwrap();
        let written = EntrySpec::from(&entry);
        let json = serde_json::to_string(&written).unwrap();
        let read: EntrySpec = serde_json::from_str(&json).unwrap();
        assert_eq!(read, written, "JSON keeps the spec");
        let again = validate_entry(&read, &td).unwrap();
        assert_eq!(again, entry, "{json}");
        assert_eq!(EntrySpec::from(&again), written, "stable after one trip");
    }
    assert_eq!(
        EntrySpec::from(&validate_entry(&minimal, &td).unwrap()),
        minimal,
        "defaults are left out"
    );
}

#[test]
fn a_users_state_outlives_logout_and_the_socket_lives_in_the_runtime_dir() {
    let p = |s: &str| Some(PathBuf::from(s));
    let paths = |runtime, state, home| super::user_paths(1000, runtime, state, home);
    assert_eq!(
        super::user_paths(0, p("/run/user/0"), p("/x"), p("/root")),
        ("/var/lib/sigil".into(), "/run/sigil/workload.sock".into())
    );
    assert_eq!(
        paths(p("/run/user/1000"), None, p("/home/a")),
        (
            "/home/a/.local/state/sigil".into(),
            "/run/user/1000/sigil/workload.sock".into()
        )
    );
    assert_eq!(
        paths(p("/run/user/1000"), p("/srv/state"), p("/home/a")).0,
        PathBuf::from("/srv/state/sigil"),
        "XDG_STATE_HOME wins"
    );
    assert_eq!(
        paths(None, None, p("/home/a")).1,
        PathBuf::from("/tmp/sigil-1000/workload.sock"),
        "no runtime dir"
    );
    assert_eq!(
        paths(None, None, None),
        (
            "/tmp/sigil-1000/state".into(),
            "/tmp/sigil-1000/workload.sock".into()
        ),
        "no home (nobody): the state beside the socket"
    );
    assert_eq!(
        paths(p("relative"), p("rel"), p("/home/a")),
        (
            "/home/a/.local/state/sigil".into(),
            "/tmp/sigil-1000/workload.sock".into()
        ),
        "relative XDG values are ignored"
    );
}
