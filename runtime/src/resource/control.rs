//! A worker's resource control: its fuel governor, the resource manager
//! tuning it (from the node's `[resource]` table, overridden at runtime by
//! the cluster config's `resource.*` keys), and the [`NodeLoad`] its
//! heartbeats carry.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use stoker_proto::meta::NodeLoad;

use super::cpu::CpuSampler;
use super::governor::Governor;
use super::manager::{calibrate, ManagerConfig, ResourceManager};
use super::scheduler::Command;
use super::settings::ClusterResource;
use super::ResourceError;
use crate::sandbox::Sandbox;

/// The name of a command as nodes report it.
pub fn command_name(c: Command) -> &'static str {
    match c {
        Command::Overclock => "overclock",
        Command::Downclock => "downclock",
        Command::Hold => "hold",
    }
}

/// A worker's governor and (optional) resource manager.
#[derive(Debug)]
pub struct ResourceControl {
    governor: Governor,
    sandbox: Arc<Sandbox>,
    /// The node's own `[resource]` table.
    local: Option<ManagerConfig>,
    state: Mutex<ControlState>,
}

#[derive(Debug, Default)]
struct ControlState {
    manager: Option<ResourceManager>,
    /// The config the manager runs with.
    running: Option<ManagerConfig>,
    /// The cluster overrides last applied.
    cluster: ClusterResource,
    fuel_per_core: Option<f64>,
    /// Reads node CPU between heartbeats while no manager samples it.
    cpu: Option<CpuSampler>,
}

impl ResourceControl {
    /// Starts the node's resource manager when its config has one.
    ///
    /// # Errors
    /// Calibration fails, or an invalid config.
    pub async fn start(
        governor: Governor,
        sandbox: Arc<Sandbox>,
        local: Option<ManagerConfig>,
    ) -> Result<Self, ResourceError> {
        let mut state = ControlState::default();
        if let Some(cfg) = &local {
            let fuel_per_core = calibrate(&sandbox).await?;
            state.manager = Some(ResourceManager::start(
                governor.clone(),
                fuel_per_core,
                cfg.clone(),
            )?);
            state.running = Some(cfg.clone());
            state.fuel_per_core = Some(fuel_per_core);
        }
        Ok(ResourceControl {
            governor,
            sandbox,
            local,
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The governor every subtask takes its fuel from.
    pub fn governor(&self) -> &Governor {
        &self.governor
    }

    /// The config the manager runs with now; `None` without a manager.
    pub fn running_config(&self) -> Option<ManagerConfig> {
        self.lock().running.clone()
    }

    /// What the resource manager is doing now. Without a manager the CPU
    /// is the utilisation since the previous call.
    pub fn load(&self) -> NodeLoad {
        let mut st = self.lock();
        if let Some(m) = &st.manager {
            let s = m.state();
            return NodeLoad {
                scheduler: s.scheduler,
                command: command_name(s.last_command).to_string(),
                allowed: s.allowed as u32,
                active: s.active as u32,
                suspended: s.suspended as u32,
                fuel_rate: s.fuel_rate.unwrap_or(0.0),
                cpu: s.cpu,
                level: s.level,
                running: 0,
                fuel_granted: s.fuel_granted,
                slots: s.slots as u32,
            };
        }
        let cpu = st.cpu.get_or_insert_with(CpuSampler::default).sample();
        drop(st);
        let g = self.governor.snapshot();
        NodeLoad {
            scheduler: String::new(),
            command: command_name(Command::Hold).to_string(),
            allowed: g.allowed as u32,
            active: g.active as u32,
            suspended: g.suspended as u32,
            fuel_rate: g.fuel_rate.unwrap_or(0.0),
            cpu,
            level: 0.0,
            running: 0,
            fuel_granted: g.fuel_granted,
            slots: g.slots as u32,
        }
    }

    /// Fuel granted per tenant on this node since it started.
    pub fn tenant_fuel(&self) -> BTreeMap<String, u64> {
        self.governor.snapshot().tenants
    }

    /// Applies the cluster config's `resource.*` entries: switches the
    /// scheduler or its band, starts a manager when the cluster asks for a
    /// scheduler and the node runs none, and stops it (lifting every limit)
    /// when neither the cluster nor the node asks for one any more. A
    /// config that cannot be applied is logged and the node keeps what it
    /// runs.
    pub async fn apply_cluster(&self, entries: &BTreeMap<String, String>) {
        let cluster = match ClusterResource::parse(entries) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cluster resource config ignored");
                return;
            }
        };
        if self.lock().cluster == cluster {
            return;
        }
        if let Err(e) = self.reconfigure(&cluster).await {
            tracing::warn!(error = %e, "cluster resource config not applied");
            return;
        }
        self.lock().cluster = cluster;
    }

    async fn reconfigure(&self, cluster: &ClusterResource) -> Result<(), ResourceError> {
        let wanted = match (&self.local, cluster.wants_manager()) {
            (None, false) => None,
            (local, _) => {
                let cfg = cluster.apply_to(&local.clone().unwrap_or_default());
                cfg.validate()?;
                Some(cfg)
            }
        };
        let Some(cfg) = wanted else {
            let mut st = self.lock();
            if st.manager.take().is_some() {
                tracing::info!("resource manager stopped by the cluster config");
                self.governor.set_rate(None);
                self.governor.set_concurrency(self.governor.config().slots);
            }
            st.running = None;
            return Ok(());
        };
        if self.lock().manager.is_none() {
            let known = self.lock().fuel_per_core;
            let fuel_per_core = match known {
                Some(f) => f,
                None => calibrate(&self.sandbox).await?,
            };
            let manager =
                ResourceManager::start(self.governor.clone(), fuel_per_core, cfg.clone())?;
            tracing::info!(scheduler = %cfg.scheduler, "resource manager started by the cluster config");
            let mut st = self.lock();
            st.manager = Some(manager);
            st.fuel_per_core = Some(fuel_per_core);
            st.running = Some(cfg);
            return Ok(());
        }
        let mut st = self.lock();
        if let Some(m) = &st.manager {
            m.set_scheduler_with(&cfg.scheduler, &cfg.cpu)?;
        }
        st.running = Some(cfg);
        Ok(())
    }
}
