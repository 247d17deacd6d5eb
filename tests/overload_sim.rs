//! The simulator's headline claims, on the paused clock (a few seconds).

#[path = "../examples/overload_sim.rs"]
mod overload_sim;

use overload_sim::{Scenario, contention, long_table, run, table};
use tower_overload::backoff::Jitter;

#[tokio::test(start_paused = true)]
async fn the_stack_beats_the_usual_retry_code_in_the_reference_storm() {
    let results = run(&Scenario::reference()).await;
    println!("{}", table(&results));
    let by_name = |name: &str| results.iter().find(|r| r.name == name).expect(name);

    // DESIGN.md: retry amplification <= 1.1x during a full outage, for the preset.
    let preset = by_name("OverloadRetryLayer foreground");
    assert!(
        preset.outage_amplification <= 1.1,
        "{:.3}",
        preset.outage_amplification
    );

    // ... and the full stack's goodput at least every other strategy's.
    let stack = by_name("full stack");
    for other in &results {
        assert!(
            stack.successes >= other.successes,
            "{} beat the stack: {} > {}",
            other.name,
            other.successes,
            stack.successes
        );
    }
    // The usual code makes the storm worse; ours does not.
    assert!(by_name("immediate retry x5").outage_amplification > 4.0);
    assert!(by_name("official SDK policy").outage_amplification > 2.0);
}

/// Defect 1 of issue 13, at the scale of the simulator: after a 30-minute
/// outage has drained the quota, the presets' retries come back with the
/// successes and rescue intermittent 529s as they did before it.
#[tokio::test(start_paused = true)]
async fn retries_come_back_after_a_long_outage() {
    let results = run(&Scenario::long_horizon()).await;
    println!("{}", long_table(&results));
    let by_name = |name: &str| results.iter().find(|r| r.name == name).expect(name);
    let preset = by_name("OverloadRetryLayer foreground");
    assert!(preset.outage_amplification <= 1.1, "{preset:?}");
    assert!(preset.late_success >= 0.97, "{:.3}", preset.late_success);
    assert!(
        preset.late_amplification >= 1.2,
        "{:.3}",
        preset.late_amplification
    );
    let none = by_name("no retry");
    assert!(none.late_success < 0.75, "{:.3}", none.late_success);
    let stack = by_name("full stack");
    assert!(stack.late_success >= 0.97, "{:.3}", stack.late_success);
}

#[test]
fn the_backoff_paper_ordering_holds() {
    let results = contention(100, 7);
    let work = |jitter: Jitter| results.iter().find(|r| r.0 == jitter).unwrap().1;
    let time = |jitter: Jitter| results.iter().find(|r| r.0 == jitter).unwrap().2;
    assert!(
        work(Jitter::None) > 10 * work(Jitter::Full),
        "no jitter does far more work"
    );
    assert!(
        time(Jitter::None) > 10.0 * time(Jitter::Full),
        "and finishes far later"
    );
    assert!(
        time(Jitter::Full) < time(Jitter::Equal),
        "full jitter finishes before equal jitter"
    );
}
