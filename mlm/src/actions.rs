//! Control actions addressed to the MLM itself (seed 004: "a message
//! addressed to an MLM is processed there"). Each is applied at most once
//! (recorded in the back-channel queue's `received` table before it is
//! applied) and answered with a message response that the MLM's own sender
//! carries up.

use std::sync::atomic::Ordering;

use rs_protocol::codec::RawMessage;
use rs_protocol::control::ControlAction;
use rs_protocol::control_messages::{
    Answer, action_of, answer_config, answer_ok, answer_refused, answer_status, answer_with,
    response_message,
};
use rs_store::outbox::Claim;
use rs_store::spool::{DeadLetterAction, Spool as _, apply_dead_letters};

use crate::Mlm;

/// Applies `m` (addressed to this MLM) once and spools the response.
/// `Ok` means it is safe to acknowledge upstream.
///
/// The action is recorded (claimed) before it is applied and marked done
/// once its answer is spooled; one found still being applied (the MLM
/// died in between) is answered `failed` and not applied again.
pub async fn apply_own(mlm: &Mlm, m: &RawMessage) -> Result<(), String> {
    let id = m.header.id.clone();
    let now = mlm.clock.now();
    let answer = match mlm
        .outbox
        .claim(id.clone(), now)
        .await
        .map_err(|e| e.to_string())?
    {
        Claim::Done => return Ok(()),
        Claim::Interrupted => {
            tracing::warn!(
                "control {} ({id}) was being applied when rs-mlm stopped; not applied again",
                m.header.class.subclass
            );
            answer_refused(
                "failed",
                "rs-mlm stopped while applying this action; it is not applied a second time",
            )
        }
        Claim::New if m.header.is_expired(now) => {
            tracing::info!(
                "control {} ({id}) arrived expired; not applied",
                m.header.class.subclass
            );
            return mlm
                .outbox
                .mark_seen(id, now)
                .await
                .map_err(|e| e.to_string());
        }
        Claim::New => {
            let answer = answer(mlm, m).await;
            mlm.stats.actions_applied.inc();
            tracing::info!(
                "control {} ({id}) for this MLM: {}",
                m.header.class.subclass,
                answer.0
            );
            rs_node::daemon::crash_point("mlm-action-applied");
            answer
        }
    };
    let response = response_message(m, mlm.id.clone(), env!("CARGO_PKG_VERSION"), answer, now)
        .map_err(|e| e.to_string())?;
    // The spool refuses a response ID it already holds (it derives from
    // the action's), so a crash between here and `mark_seen` answers once.
    mlm.spool
        .enqueue(vec![response.to_raw()], now)
        .await
        .map_err(|e| e.to_string())?;
    mlm.outbox
        .mark_seen(id, now)
        .await
        .map_err(|e| e.to_string())?;
    if mlm.restart.load(Ordering::Relaxed) {
        // Answered and marked applied: stop gracefully (delivering the
        // answer) and start again with the new file.
        mlm.stop.cancel();
    }
    Ok(())
}

async fn answer(mlm: &Mlm, m: &RawMessage) -> Answer {
    let action = match action_of(m) {
        Ok(a) => a,
        Err(refused) => return (refused, Vec::new(), None),
    };
    match &action {
        ControlAction::Ping => answer_ok(),
        ControlAction::GetStatus => answer_status(&mlm.status_tree().await),
        ControlAction::GetConfig => answer_config(toml::to_string(&mlm.cfg)),
        ControlAction::EnableForwarding | ControlAction::DisableForwarding => {
            // Its own sender only: what it relays synchronously is the
            // sending proxies' business.
            let off = matches!(action, ControlAction::DisableForwarding);
            mlm.paused.store(off, Ordering::Relaxed);
            answer_ok()
        }
        ControlAction::ConfigChange { config } => {
            let Some(path) = &mlm.config_path else {
                return answer_refused(
                    "unsupported",
                    "this MLM was not started from a configuration file",
                );
            };
            let identity = vec![mlm.cfg.id.clone(), mlm.cfg.data_dir.display().to_string()];
            match rs_node::config_file::change(path, config, &identity, |text| {
                let c = crate::Config::parse(text)?;
                Ok(vec![c.id, c.data_dir.display().to_string()])
            }) {
                Ok(done) => {
                    mlm.restart.store(true, Ordering::Relaxed);
                    answer_with("text/plain", done)
                }
                Err(o) => (o, Vec::new(), None),
            }
        }
        ControlAction::ReplayDeadLetters(m) => {
            apply_dead_letters(
                &mlm.spool,
                DeadLetterAction::Replay,
                m.clone(),
                mlm.clock.now(),
            )
            .await
        }
        ControlAction::DiscardDeadLetters(m) => {
            apply_dead_letters(
                &mlm.spool,
                DeadLetterAction::Discard,
                m.clone(),
                mlm.clock.now(),
            )
            .await
        }
        // Actions on a proxy's integrators and instances, and the ones an
        // MLM has no mechanism for (no package installer, no remote stop:
        // a farm member is stopped by its service manager).
        ControlAction::Shutdown
        | ControlAction::SoftwareUpdate { .. }
        | ControlAction::EnableInstance(_)
        | ControlAction::DisableInstance(_)
        | ControlAction::DeregisterIntegrator(_) => answer_refused(
            "unsupported",
            format!("{} is not an action an MLM carries out", action.name()),
        ),
    }
}
