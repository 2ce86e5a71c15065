//! The hello-world balancer of the README: the first eligible backend takes
//! every flow (an active/standby pair, in ten lines).
//!
//! Build: `cargo build -p hello-balancer --target wasm32-wasip2 --release`,
//! then point a pool at it: `balancer = "target/wasm32-wasip2/release/hello_balancer.wasm"`.

use fulcrum_sdk::{Backend, Balancer, Flow, Selection};

#[derive(Default)]
pub struct First(Vec<u32>);

impl Balancer for First {
    fn backends_changed(&mut self, backends: &[Backend]) {
        self.0 = backends.iter().filter(|b| b.is_eligible()).map(|b| b.id).collect();
    }
    fn select(&mut self, _flow: &Flow) -> Selection {
        self.0.first().map_or(Selection::Reject, |&id| Selection::Backend(id))
    }
}
fulcrum_sdk::export_balancer!(First);

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_sdk::testing::{backends, flow};

    #[test]
    fn first_eligible_wins() {
        let mut set = backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 100)]);
        let mut p = First::default();
        p.backends_changed(&set);
        assert_eq!(p.select(&flow("10.1.1.1:1", "10.9.9.9:80")), Selection::Backend(0));
        set[0].state = fulcrum_sdk::BackendState::Down;
        p.backends_changed(&set);
        assert_eq!(p.select(&flow("10.1.1.1:1", "10.9.9.9:80")), Selection::Backend(1));
    }
}
