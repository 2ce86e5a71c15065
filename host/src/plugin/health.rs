//! Health plugins: map a probe result or a custom signal to a verdict. They
//! run on the control thread (one instance per probe or signal), off the data
//! path. A faulting health plugin never decides: that observation is judged by
//! the stock default (`stock:http-200`, built natively) and the fault counted.

use fulcrum_sdk::{Backend, HealthCheck, Observation, Verdict};

use super::Fault;
use super::supervise::{CallError, arm, classify};
use super::world::{HealthWorld, Instance, Plugin};

/// Longest reason kept from a plugin's verdict, in bytes.
const MAX_REASON: usize = 200;

/// A health plugin, compiled and linked.
pub type HealthPlugin = Plugin<HealthWorld>;
/// One instance of a health plugin (owned by the control thread).
pub type HealthInstance = Instance<HealthWorld>;

impl Instance<HealthWorld> {
    /// The plugin's verdict, validated; the stock default's on any fault.
    pub fn evaluate(&mut self, backend: &Backend, observation: &Observation) -> Verdict {
        let timer = self.live.calls.call();
        let answer = self.call(backend, observation);
        self.plugin.info.stats.timed(timer);
        match answer {
            Ok(mut verdict) if verdict.weight.is_none_or(|w| w <= 100) => {
                self.live.ok();
                if let Some(reason) = &mut verdict.reason {
                    reason.truncate(reason.floor_char_boundary(MAX_REASON));
                    if let std::borrow::Cow::Owned(clean) = super::inert(reason) {
                        *reason = clean;
                    }
                }
                return verdict;
            }
            Ok(verdict) => {
                self.live.fault(Fault::InvalidAnswer, &format!("weight {:?} is not 0..=100", verdict.weight))
            }
            Err(error) => self.live.failed(error),
        }
        self.plugin.info.stats.fallbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        fulcrum_plugin_http_200::Http200.evaluate(backend, observation)
    }

    fn call(&mut self, backend: &Backend, observation: &Observation) -> Result<Verdict, CallError> {
        let plugin = &self.plugin;
        let live = self.live.live(|| plugin.instantiate())?;
        arm(&mut live.store, plugin.runtime.call_deadline());
        let result = live.bindings.call_evaluate(&mut live.store, backend.into(), &observation.into());
        let verdict = result.map_err(|e| Some(classify(e, live.store.data_mut(), "evaluate")))?;
        Ok(verdict.into())
    }
}
