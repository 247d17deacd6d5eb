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

/// Issue 14, item 7: the rate-limit scenario (50 RPM, 30k ITPM, 8k OTPM,
/// bursty calls of 100 to 50,000 tokens), the pacing layer's figures.
#[cfg(feature = "pacing")]
mod rate_limit {
    use super::overload_sim::rate_limit::{RateLimitResult, RateLimitScenario, run, table};

    async fn results() -> Vec<RateLimitResult> {
        let results = run(&RateLimitScenario::reference()).await;
        println!("{}", table(&results));
        results
    }

    fn pacing(results: &[RateLimitResult]) -> &RateLimitResult {
        results
            .iter()
            .find(|r| r.name == "pacing + foreground retry")
            .expect("the pacing strategy")
    }

    #[tokio::test(start_paused = true)]
    async fn pacing_stays_under_the_limits_and_uses_the_quota() {
        let results = results().await;
        let pacing = pacing(&results);
        // Zero 429s in the steady state (after the first minute).
        assert_eq!(pacing.steady_429, 0, "{pacing:?}");
        // At least 95% of the binding quota used (here ITPM binds).
        assert!(
            pacing.itpm_use.max(pacing.otpm_use) >= 0.95,
            "ITPM {:.3}, OTPM {:.3}",
            pacing.itpm_use,
            pacing.otpm_use
        );
        // No call past its deadline: a call that cannot get budget in
        // time fails with a typed error before it.
        assert_eq!(pacing.past_deadline, 0, "{pacing:?}");
        // The useful work done (input tokens of the successful calls per
        // minute) is above every other strategy's. This is not the issue's
        // goodput figure (calls per minute): see the test below.
        for other in results.iter().filter(|r| r.name != pacing.name) {
            assert!(
                pacing.token_goodput > other.token_goodput,
                "{} did more useful work: {:.0} >= {:.0} tokens/min",
                other.name,
                other.token_goodput,
                pacing.token_goodput
            );
        }
    }

    /// The goodput figure (strictly the most ok calls per minute)
    /// is not reached, and README says so: the official SDK policy edges
    /// pacing (7.92 vs 7.83/min), since retrying 429s serves the small
    /// prompts that slip in and fails the large ones while pacing serves its
    /// queue in order. What README claims instead is checked here: pacing
    /// beats retry-only and reserve-and-reject, and trails the best by at
    /// most 2%.
    #[tokio::test(start_paused = true)]
    async fn pacing_calls_per_minute_trail_the_best_by_at_most_two_percent() {
        let results = results().await;
        let pacing = pacing(&results);
        let best = results.iter().map(|r| r.goodput).fold(f64::MIN, f64::max);
        assert!(
            pacing.goodput >= 0.98 * best,
            "pacing {:.2} vs best {best:.2} calls/min",
            pacing.goodput
        );
        for name in ["retry only (foreground)", "reserve-and-reject (LiteLLM)"] {
            let other = results.iter().find(|r| r.name == name).expect(name);
            assert!(
                pacing.goodput > other.goodput,
                "{name} beat pacing: {:.2} >= {:.2} calls/min",
                other.goodput,
                pacing.goodput
            );
        }
    }
}
