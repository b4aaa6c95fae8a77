//! Checks of what agents and operators send, before anything is stored:
//! lengths and characters of free text, command specs, provider names,
//! image references and container names, and metric batches.

use tonic::Status;

use crate::backend::sinks::Rejection;
use crate::proto;

/// Checks a free-text field an agent or operator sends.
pub(super) fn check_len(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes long; at most {max} are allowed",
            value.len()
        )));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(Status::invalid_argument(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

/// Longest container id, command id or run id kept from a container event.
const MAX_EVENT_ID: usize = 128;
/// Longest container name kept from a container event.
const MAX_EVENT_NAME: usize = 256;
/// Longest `Capacity.docker_status` kept.
pub(super) const MAX_DOCKER_STATUS: usize = 256;
/// Longest `CommandResult.message` kept.
pub(super) const MAX_RESULT_MESSAGE: usize = 4096;

/// Clips and escapes the text of a container event (see [`crate::text`]).
/// Not refused: the event carries a run's state, and events behind it in
/// the agent's report would wait for it.
pub(super) fn clean_container_event(c: &mut proto::ContainerEvent) {
    for (field, max) in [
        (&mut c.container_id, MAX_EVENT_ID),
        (&mut c.name, MAX_EVENT_NAME),
        (&mut c.command_id, MAX_EVENT_ID),
        (&mut c.run_id, MAX_EVENT_ID),
    ] {
        *field = crate::text::clip(field, max);
    }
}

/// Clips and escapes the text of a capacity report.
pub(super) fn clean_capacity(c: &mut proto::Capacity) {
    c.docker_status = crate::text::clip(&c.docker_status, MAX_DOCKER_STATUS);
}

/// Clips and escapes a result's message (what `ctl` shows of it) and
/// command id (which is logged).
pub(super) fn clean_result(r: &mut proto::CommandResult) {
    r.command_id = crate::text::clip(&r.command_id, MAX_EVENT_ID);
    r.message = crate::text::clip(&r.message, MAX_RESULT_MESSAGE);
}

pub(super) fn check_info(info: &proto::AgentInfo) -> Result<(), Status> {
    check_len("info.hostname", &info.hostname, 255)?;
    check_len("info.version", &info.version, 64)?;
    check_len("info.os", &info.os, 64)?;
    check_len("info.arch", &info.arch, 64)?;
    check_len("info.transport_reason", &info.transport_reason, 256)
}

/// What `Enroll` needs of an agent's info besides [`check_info`]: a
/// hostname and a version, without which the backend takes the agent's
/// later calls for anonymous ones (`doctor`) and never shows it connected
/// nor places runs on it.
pub(super) fn check_enroll_info(info: &proto::AgentInfo) -> Result<(), Status> {
    for (field, value) in [
        ("info.hostname", &info.hostname),
        ("info.version", &info.version),
    ] {
        if value.trim().is_empty() {
            return Err(Status::invalid_argument(format!(
                "{field} is empty: an enrolling agent sets AgentInfo.hostname (1 to 255 bytes) \
                 and AgentInfo.version (1 to 64 bytes)"
            )));
        }
    }
    Ok(())
}

/// A valid provider name: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn check_provider_name(name: &str) -> Result<(), Status> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(Status::invalid_argument(format!(
            "provider name {name:?} is not valid: use 1 to 64 characters of A-Z a-z 0-9 . _ -"
        )));
    }
    Ok(())
}

/// Checks a command before it is queued.
pub fn check_spec(spec: &proto::CommandSpec) -> Result<(), Status> {
    use proto::command_spec::Kind as K;
    match &spec.kind {
        None => Err(Status::invalid_argument(
            "command spec is empty: set one kind, e.g. {\"ping\": {}}",
        )),
        Some(K::Ping(p)) => {
            if p.delay_ms > 600_000 {
                return Err(Status::invalid_argument(format!(
                    "ping.delay_ms is {}; at most 600000 is allowed",
                    p.delay_ms
                )));
            }
            if p.payload.len() > 1024 {
                return Err(Status::invalid_argument(format!(
                    "ping.payload is {} bytes; at most 1024 are allowed",
                    p.payload.len()
                )));
            }
            Ok(())
        }
        Some(K::PullImage(p)) => check_image("pull_image.image", &p.image),
        Some(K::RunContainer(r)) => {
            check_image("run_container.image", &r.image)?;
            check_name("run_container.name", &r.name, true)?;
            if !r.cpus.is_finite() || r.cpus < 0.0 {
                return Err(Status::invalid_argument(format!(
                    "run_container.cpus {} is not a non-negative number of cores",
                    r.cpus
                )));
            }
            if r.env.len() + r.labels.len() + r.command.len() + r.entrypoint.len() > 1000 {
                return Err(Status::invalid_argument(
                    "run_container has more than 1000 env, label, command and entrypoint entries",
                ));
            }
            Ok(())
        }
        Some(K::StopContainer(c)) => check_name("stop_container.container", &c.container, false),
        Some(K::RemoveContainer(c)) => {
            check_name("remove_container.container", &c.container, false)
        }
        Some(K::ContainerLogs(c)) => check_name("container_logs.container", &c.container, false),
        Some(K::ListContainers(_)) => Ok(()),
    }
}

pub(in crate::backend) fn check_image(field: &str, image: &str) -> Result<(), Status> {
    if image.is_empty()
        || image.len() > 512
        || image.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(Status::invalid_argument(format!(
            "{field} {image:?} is not an image reference (1 to 512 characters, no spaces)"
        )));
    }
    Ok(())
}

fn check_name(field: &str, name: &str, may_be_empty: bool) -> Result<(), Status> {
    if (name.is_empty() && !may_be_empty)
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(Status::invalid_argument(format!(
            "{field} {name:?} is not a container id or name (1 to 128 of A-Z a-z 0-9 . _ -)"
        )));
    }
    Ok(())
}

/// Checks that a batch is internally consistent. The decoder in
/// [`crate::metrics::encode`] is the one validator of batches; its error
/// names the offending sample, series or field, and the message starts with
/// the reason counted in `uplink_backend_metric_batches_rejected_total`.
pub fn validate_batch(b: &proto::MetricBatch) -> Result<(), Status> {
    crate::metrics::encode::decode(b).map(|_| ()).map_err(|e| {
        Status::invalid_argument(format!(
            "metric batch rejected ({}): {e}",
            Rejection::of(&e).as_str()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_checked() {
        assert!(check_spec(&proto::CommandSpec::default()).is_err());
        let big = proto::CommandSpec {
            kind: Some(proto::command_spec::Kind::Ping(proto::Ping {
                delay_ms: 600_001,
                payload: String::new(),
            })),
        };
        assert!(check_spec(&big).unwrap_err().message().contains("600000"));
    }

    #[test]
    fn inconsistent_batches_are_rejected_with_a_reason() {
        let mut b = proto::MetricBatch {
            symbols: vec!["".into(), "m".into()],
            series: vec![proto::Series {
                name: 1,
                ..Default::default()
            }],
            sample_series: vec![0],
            sample_time_delta_ms: vec![0],
            sample_values: vec![1.0],
            ..Default::default()
        };
        assert!(validate_batch(&b).is_ok());
        b.sample_series = vec![1];
        assert!(
            validate_batch(&b)
                .unwrap_err()
                .message()
                .contains("series 1")
        );
        b.sample_series = vec![0, 0];
        assert!(validate_batch(&b).unwrap_err().message().contains("differ"));
    }

    #[test]
    fn agent_text_is_clipped_and_escaped_at_intake() {
        let mut c = proto::Capacity {
            docker_status: format!("27.1\n\u{1b}[2Jfake row{}", "x".repeat(4 << 20)),
            ..Default::default()
        };
        clean_capacity(&mut c);
        assert!(c.docker_status.len() <= MAX_DOCKER_STATUS);
        assert!(c.docker_status.starts_with("27.1\\n\\e[2Jfake row"));
        let mut e = proto::ContainerEvent {
            name: "web\nINFO forged".into(),
            container_id: "c".repeat(10_000),
            ..Default::default()
        };
        clean_container_event(&mut e);
        assert_eq!(e.name, "web\\nINFO forged");
        assert!(e.container_id.len() <= MAX_EVENT_ID);
        let mut r = proto::CommandResult {
            message: "m".repeat(1 << 20),
            ..Default::default()
        };
        clean_result(&mut r);
        assert!(r.message.len() <= MAX_RESULT_MESSAGE);
    }

    #[test]
    fn provider_names_are_checked() {
        assert!(check_provider_name("lab-1.eu_west").is_ok());
        assert!(check_provider_name("").is_err());
        assert!(check_provider_name("a b").is_err());
    }
}
