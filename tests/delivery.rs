//! Delivery over both rungs with the real binary as agent and a real TLS
//! backend on loopback: enrollment, pings, offline queues, restarts of
//! either side, and the at-most-once guarantee.

use std::time::Duration;

use uplink::proto::{self, CommandStatus};
use uplink_testkit::*;

const RUNGS: [&str; 2] = ["grpc", "longpoll"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_and_ping_round_trip_on_each_rung() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let admin = b.admin();
    for rung in RUNGS {
        let state = dir.path().join(format!("agent-{rung}"));
        let host = format!("host-{rung}");
        let mut a = agent(&b, rung, &state, &host);
        let view = connected_agent(&admin, &host, rung).await;
        assert_eq!(view.provider, "default");
        assert_eq!(view.version, uplink::VERSION);

        // The identity is kept, private to its owner.
        let ident = state.join("identity.json");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&ident).unwrap().permissions(),
        );
        assert_eq!(
            mode & 0o077,
            0,
            "identity.json readable by others: {mode:o}"
        );

        let p = admin
            .ping(&view.id, "hello", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            p.view.state,
            proto::CommandState::Done as i32,
            "{rung}: {:?}",
            p.view
        );
        let r = p.view.result.unwrap();
        assert_eq!(r.status, CommandStatus::Ok as i32);
        match r.detail {
            Some(proto::command_result::Detail::Ping(pr)) => assert_eq!(pr.payload, "hello"),
            other => panic!("{rung}: no ping result: {other:?}"),
        }

        // A restarted agent reuses its identity: still one agent, same id.
        assert!(a.terminate(Duration::from_secs(10)).await.success());
        let a2 = agent(&b, rung, &state, &host);
        let again = connected_agent(&admin, &host, rung).await;
        assert_eq!(again.id, view.id);
        assert_eq!(a2.count(&["enrolled"]), 0, "{}", a2.logs());

        // No secret in any log line.
        for logs in [a.logs(), a2.logs()] {
            assert!(
                !logs.contains(b.enroll_token.expose()),
                "enrollment token leaked:\n{logs}"
            );
            let cred: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&ident).unwrap()).unwrap();
            assert!(
                !logs.contains(cred["credential"].as_str().unwrap()),
                "credential leaked:\n{logs}"
            );
        }
    }
    let agents = admin.agents("").await.unwrap();
    assert_eq!(agents.len(), 2, "{agents:?}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_queued_while_offline_arrive_on_connect_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let admin = b.admin();
    for rung in RUNGS {
        let state = dir.path().join(format!("agent-{rung}"));
        let host = format!("offline-{rung}");
        let mut a = agent(&b, rung, &state, &host);
        let view = connected_agent(&admin, &host, rung).await;
        assert!(a.terminate(Duration::from_secs(10)).await.success());

        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(
                admin
                    .enqueue(&view.id, ping(0, &format!("{i}")))
                    .await
                    .unwrap()
                    .id,
            );
        }
        let a = agent(&b, rung, &state, &host);
        for id in &ids {
            let v = result_of(&admin, id, Duration::from_secs(15)).await;
            assert_eq!(v.result.unwrap().status, CommandStatus::Ok as i32);
        }
        // Executed in seq order, each once.
        let lines: Vec<String> = a
            .stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("executing command"))
            .cloned()
            .collect();
        let order: Vec<usize> = ids
            .iter()
            .map(|id| {
                lines
                    .iter()
                    .position(|l| l.contains(id.as_str()))
                    .expect("executed")
            })
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "{rung}: out of order: {lines:#?}"
        );
        assert_eq!(lines.len(), ids.len(), "{rung}: {lines:#?}");
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_queued_mid_poll_is_answered_without_waiting_for_the_hold() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestBackend::config(&dir.path().join("backend"));
    cfg.poll_hold = Duration::from_secs(25);
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let admin = b.admin();
    let _a = agent(&b, "longpoll", &dir.path().join("agent"), "midpoll");
    let view = connected_agent(&admin, "midpoll", "longpoll").await;
    // Let the agent's poll be held by the backend.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let id = admin.enqueue(&view.id, ping(0, "now")).await.unwrap().id;
    // Far less than the 25 s hold: a poll that waited for its hold fails this.
    let v = result_of(&admin, &id, Duration::from_secs(8)).await;
    assert_eq!(v.result.unwrap().status, CommandStatus::Ok as i32);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_restart_loses_no_agent_and_no_queued_command() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let admin = b.admin();
    let mut agents = Vec::new();
    let mut views = Vec::new();
    for rung in RUNGS {
        let host = format!("restart-{rung}");
        agents.push(agent(
            &b,
            rung,
            &dir.path().join(format!("agent-{rung}")),
            &host,
        ));
        views.push(connected_agent(&admin, &host, rung).await);
    }
    // Queue a command for the second agent while it is stopped, then restart
    // the backend from its data dir on the same port.
    assert!(agents[1].terminate(Duration::from_secs(10)).await.success());
    let queued = admin
        .enqueue(&views[1].id, ping(0, "queued before restart"))
        .await
        .unwrap();
    let (cfg, addr) = b.stop().await;
    let b = TestBackend::start_with(cfg, addr).await;
    let admin = b.admin();
    assert_eq!(
        admin.agents("").await.unwrap().len(),
        2,
        "agents survive the restart"
    );

    // The connected agent reconnects by itself; the stopped one comes back.
    let first = connected_agent(&admin, "restart-grpc", "grpc").await;
    assert_eq!(first.id, views[0].id);
    agents[1] = agent(
        &b,
        "longpoll",
        &dir.path().join("agent-longpoll"),
        "restart-longpoll",
    );
    let v = result_of(&admin, &queued.id, Duration::from_secs(20)).await;
    assert_eq!(v.result.unwrap().status, CommandStatus::Ok as i32);
    for view in &views {
        let p = admin
            .ping(&view.id, "after", Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(
            p.view.state,
            proto::CommandState::Done as i32,
            "{:?}",
            p.view
        );
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_never_executed_twice_across_agent_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let admin = b.admin();
    let state = dir.path().join("agent");
    let mut a1 = agent(&b, "grpc", &state, "once");
    let view = connected_agent(&admin, "once", "grpc").await;

    // 1. A finished command.
    let done = admin
        .ping(&view.id, "first", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(done.view.state, proto::CommandState::Done as i32);
    // 2. A command killed mid-execution (kill -9 while it runs).
    let long = admin.enqueue(&view.id, ping(60_000, "long")).await.unwrap();
    a1.wait_log(&["executing command", &long.id], Duration::from_secs(10))
        .await;
    a1.kill9().await;

    // 3. The agent comes back from its state dir.
    let a2 = agent(&b, "grpc", &state, "once");

    // The interrupted command is reported, not rerun.
    let v = result_of(&admin, &long.id, Duration::from_secs(20)).await;
    let r = v.result.unwrap();
    assert_eq!(r.status, CommandStatus::Interrupted as i32, "{r:?}");
    assert!(r.message.contains("not run again"), "{}", r.message);
    wait_for(Duration::from_secs(10), "ack caught up", || async {
        let a = admin
            .agents("")
            .await
            .ok()?
            .into_iter()
            .find(|a| a.id == view.id)?;
        (a.acked_seq == 2 && a.pending_commands == 0).then_some(())
    })
    .await;
    for id in [&done.command_id, &long.id] {
        let runs = a1.count(&["executing command", id]) + a2.count(&["executing command", id]);
        assert_eq!(
            runs,
            1,
            "command {id} executed {runs} times:\n{}\n---\n{}",
            a1.logs(),
            a2.logs()
        );
    }
    // And new work still flows.
    let p = admin
        .ping(&view.id, "later", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(p.view.state, proto::CommandState::Done as i32);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stops_gracefully_on_sigterm_and_finishes_running_work() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let admin = b.admin();
    let mut a = agent(&b, "grpc", &dir.path().join("agent"), "graceful");
    let view = connected_agent(&admin, "graceful", "grpc").await;
    let c = admin.enqueue(&view.id, ping(1_000, "short")).await.unwrap();
    a.wait_log(&["executing command", &c.id], Duration::from_secs(10))
        .await;
    let status = a.terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}\n{}", a.logs());
    // The running command finished within the grace time and was reported.
    let v = result_of(&admin, &c.id, Duration::from_secs(1)).await;
    assert_eq!(v.result.unwrap().status, CommandStatus::Ok as i32);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_command_kinds_get_a_clear_failure() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let admin = b.admin();
    let _a = agent(&b, "longpoll", &dir.path().join("agent"), "unknown-kind");
    let view = connected_agent(&admin, "unknown-kind", "longpoll").await;
    // A command kind from a newer contract arrives as a spec whose kind
    // this agent cannot decode, i.e. as an empty spec. The admin API refuses
    // to queue one, so queue it through the store, as a newer backend would.
    let spec = proto::CommandSpec::default();
    let cmd = b
        .core
        .store()
        .enqueue(&view.id, "cmd_future", &spec, 1)
        .await
        .unwrap()
        .unwrap();
    b.core.wake(&view.id, cmd.seq);
    let v = result_of(&admin, "cmd_future", Duration::from_secs(10)).await;
    let r = v.result.unwrap();
    assert_eq!(r.status, CommandStatus::Unsupported as i32);
    assert!(r.message.contains("not supported"), "{}", r.message);
    b.stop().await;
}

/// A result reported after a later event of its epoch (two Reports in
/// flight, the later one first) is refused, not acknowledged, on both
/// rungs; sent in order it is stored and the command is done (before:
/// acked_seq 2 both times, the result gone and the command ACCEPTED
/// forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_out_of_order_are_refused_not_acknowledged_on_both_rungs() {
    use uplink::client::{ConnectClient, FailureKind};
    use uplink::secret::Secret;
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(dir.path()).await;
    let admin = b.admin();
    let agent = push::enroll(&b, "h-order").await;
    let event = |seq: u64, kind: proto::event::Kind| proto::Event {
        seq,
        time_unix_ms: 1,
        kind: Some(kind),
    };
    let capacity = || proto::event::Kind::Capacity(proto::Capacity::default());
    let ping = || proto::CommandSpec {
        kind: Some(proto::command_spec::Kind::Ping(proto::Ping::default())),
    };
    let grpc = push::grpc_client(&b).await;
    let connect =
        ConnectClient::new(&b.url, &b.net()).with_auth(Secret::new(agent.credential.clone()));
    for (rung, epoch) in [("grpc", (1u64 << 63) + 1), ("connect", (1u64 << 63) + 2)] {
        let cmd = admin.enqueue(&agent.id, ping()).await.unwrap();
        let result = proto::event::Kind::Result(proto::CommandResult {
            command_id: cmd.id.clone(),
            status: CommandStatus::Ok as i32,
            message: "pong".into(),
            ..Default::default()
        });
        let send = |events: Vec<proto::Event>| {
            let req = proto::ReportRequest {
                ack: cmd.seq,
                epoch,
                events,
            };
            let (grpc, connect, agent) = (grpc.clone(), &connect, &agent);
            async move {
                if rung == "grpc" {
                    let mut r = tonic::Request::new(req);
                    r.metadata_mut().insert(
                        "authorization",
                        format!("Bearer {}", agent.credential).parse().unwrap(),
                    );
                    let mut grpc = grpc;
                    grpc.report(r)
                        .await
                        .map(|r| r.into_inner().acked_seq)
                        .map_err(|s| s.code())
                } else {
                    connect
                        .call::<_, proto::ReportResponse>(
                            "uplink.v1.AgentService",
                            "Report",
                            &req,
                            Duration::from_secs(10),
                        )
                        .await
                        .map(|r| r.acked_seq)
                        .map_err(|e| match e.kind {
                            FailureKind::Status(code) => code,
                            other => panic!("{rung}: {other:?}: {}", e.message),
                        })
                }
            }
        };
        // The later Report arrives first: refused, nothing acknowledged.
        assert_eq!(
            send(vec![event(2, capacity())]).await,
            Err(tonic::Code::FailedPrecondition),
            "{rung}"
        );
        // Then the earlier one, and the later one again.
        assert_eq!(send(vec![event(1, result.clone())]).await, Ok(1), "{rung}");
        assert_eq!(send(vec![event(2, capacity())]).await, Ok(2), "{rung}");
        let view = admin
            .command(&cmd.id, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            view.state,
            proto::CommandState::Done as i32,
            "{rung}: {view:?}"
        );
        // Seq 0 is never skipped silently either.
        assert_eq!(
            send(vec![event(0, capacity())]).await,
            Err(tonic::Code::InvalidArgument),
            "{rung}"
        );
    }
    b.stop().await;
}

/// A call with the agent's credential but no `AgentInfo` (`doctor`) is not
/// the agent: after an anonymous poll, an agent that stopped polling is
/// still shown disconnected (before: connected for 5 s after it, and
/// eligible for run placement meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_poll_does_not_make_a_gone_agent_look_connected() {
    use uplink::client::ConnectClient;
    use uplink::secret::Secret;
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(dir.path()).await;
    let admin = b.admin();
    let agent = push::enroll(&b, "h-anon").await;
    let connect =
        ConnectClient::new(&b.url, &b.net()).with_auth(Secret::new(agent.credential.clone()));
    let poll = |info: Option<proto::AgentInfo>| {
        let req = proto::PollRequest {
            ack: 0,
            hold_ms: 100,
            info,
        };
        let connect = &connect;
        async move {
            connect
                .call::<_, proto::PollResponse>(
                    "uplink.v1.AgentService",
                    "Poll",
                    &req,
                    Duration::from_secs(10),
                )
                .await
                .expect("poll answered")
        }
    };
    let connected = || async {
        admin
            .agents("")
            .await
            .unwrap()
            .into_iter()
            .find(|v| v.id == agent.id)
            .expect("the agent is listed")
            .connected
    };
    // The agent's own poll: connected, then gone once it stops polling.
    poll(Some(proto::AgentInfo {
        hostname: "h-anon".into(),
        version: "test".into(),
        ..Default::default()
    }))
    .await;
    assert!(connected().await, "connected after its own poll");
    wait_for(Duration::from_secs(30), "the agent shown gone", || async {
        (!connected().await).then_some(())
    })
    .await;
    // A poll without AgentInfo: still gone.
    poll(None).await;
    assert!(
        !connected().await,
        "an anonymous poll made the gone agent look connected"
    );
    b.stop().await;
}
