//! Start-up calibration: how much fuel one core of this machine burns per
//! second, so that fuel rates can be configured in cores.
//!
//! A small CPU-bound wasm loop (trial division, like the kernels tasks
//! usually run) is run on the node's engine until a known
//! amount of fuel is spent; the fastest of a few runs is kept, since other
//! load on the machine can only make a run slower. Fuel per second differs a
//! little between guests (fuel counts instructions, not time), which is why
//! the resource manager steers by measured CPU and uses this only as a unit.

use std::time::{Duration, Instant};

use wasmtime::{Engine, Instance, Module, Store, Trap};

use super::ResourceError;

/// Trial division, the shape of the CPU-bound kernels tasks usually run:
/// for odd `n` from a million up, divide by odd `i` while `i * i <= n`.
/// Runs until its fuel is spent.
const SPIN_WAT: &str = r#"
(module
  (func (export "spin") (param $limit i64) (result i64)
    (local $n i64) (local $i i64) (local $acc i64) (local $k i64)
    (local.set $n (i64.const 1000003))
    (local.set $i (i64.const 3))
    (loop $again
      (if (i64.gt_u (i64.mul (local.get $i) (local.get $i)) (local.get $n))
        (then
          (local.set $n (i64.add (local.get $n) (i64.const 2)))
          (local.set $i (i64.const 3))))
      (local.set $acc
        (i64.add (local.get $acc)
          (i64.extend_i32_u (i64.eqz (i64.rem_u (local.get $n) (local.get $i))))))
      (local.set $i (i64.add (local.get $i) (i64.const 2)))
      (local.set $k (i64.add (local.get $k) (i64.const 1)))
      (br_if $again (i64.lt_u (local.get $k) (local.get $limit))))
    (local.get $acc)))
"#;

/// Fuel one core burns per second, measured on `engine` (which must meter
/// fuel) over `runs` runs of about `run_time` each. Blocks the thread for
/// about `runs * run_time`: call it from `spawn_blocking` in async code.
///
/// # Errors
/// The engine does not meter fuel, or the loop cannot be compiled or run.
pub fn fuel_per_core_second(
    engine: &Engine,
    run_time: Duration,
    runs: u32,
) -> Result<f64, ResourceError> {
    let wasm = wat::parse_str(SPIN_WAT)
        .map_err(|e| ResourceError::Calibration(format!("cannot assemble the loop: {e}")))?;
    let module = Module::new(engine, wasm)
        .map_err(|e| ResourceError::Calibration(format!("cannot compile the loop: {e:#}")))?;
    // A first short run sizes the others.
    let probe = 20_000_000;
    let rate = burn(engine, &module, probe)?;
    let fuel = ((rate * run_time.as_secs_f64()) as u64).max(probe);
    let mut best = rate;
    for _ in 0..runs {
        best = best.max(burn(engine, &module, fuel)?);
    }
    tracing::info!(fuel_per_second = best as u64, "calibrated fuel per core");
    Ok(best)
}

/// Runs the loop until `fuel` is spent; fuel per second of that run.
fn burn(engine: &Engine, module: &Module, fuel: u64) -> Result<f64, ResourceError> {
    let fail = |what: &str, e: wasmtime::Error| {
        ResourceError::Calibration(format!("cannot {what} the loop: {e:#}"))
    };
    let mut store = Store::new(engine, ());
    store.set_fuel(fuel).map_err(|e| fail("give fuel to", e))?;
    let instance = Instance::new(&mut store, module, &[]).map_err(|e| fail("instantiate", e))?;
    let spin = instance
        .get_typed_func::<i64, i64>(&mut store, "spin")
        .map_err(|e| fail("find", e))?;
    let started = Instant::now();
    let spent = match spin.call(&mut store, i64::MAX) {
        Ok(_) => return Err(ResourceError::Calibration("the loop ended early".into())),
        Err(e) if e.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) => fuel,
        Err(e) => return Err(fail("run", e)),
    };
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    Ok(spent as f64 / secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_plausible_rate() {
        let mut config = wasmtime::Config::new();
        config.consume_fuel(true);
        let engine = Engine::new(&config).unwrap();
        let rate = fuel_per_core_second(&engine, Duration::from_millis(30), 2).unwrap();
        // Any core of the last decades runs between 10 million and 100
        // billion simple wasm instructions per second.
        assert!((1e7..1e11).contains(&rate), "{rate}");
    }

    #[test]
    fn needs_fuel_metering() {
        let engine = Engine::default();
        let err = fuel_per_core_second(&engine, Duration::from_millis(10), 1).unwrap_err();
        assert!(err.to_string().contains("calibrat"), "{err}");
    }
}
