//! [`PriceTable`]: token usage turned into the `tower_overload.cost` counter.

use std::collections::HashMap;
use std::sync::Arc;

/// Dollars per million tokens of one model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prices {
    /// Input not read from or written to the prompt cache.
    pub input: f64,
    /// Output.
    pub output: f64,
    /// Input read from the prompt cache.
    pub cache_read: f64,
    /// Input written to the prompt cache.
    pub cache_write: f64,
}

impl Prices {
    /// Prices in dollars per million tokens.
    ///
    /// ```
    /// # use tower_overload::metrics::Prices;
    /// let opus = Prices::per_million(5.0, 25.0, 0.5, 6.25);
    /// assert_eq!(opus.output, 25.0);
    /// ```
    pub const fn per_million(input: f64, output: f64, cache_read: f64, cache_write: f64) -> Self {
        Self {
            input,
            output,
            cache_read,
            cache_write,
        }
    }

    /// What `usage` costs, in millionths of a dollar (rounded).
    ///
    /// ```
    /// # use tower_overload::{metrics::Prices, usage::Usage};
    /// let usage = Usage { input_tokens: Some(1_000), output_tokens: Some(100), ..Default::default() };
    /// // 1,000 × $5/M + 100 × $25/M = $0.0075
    /// assert_eq!(Prices::per_million(5.0, 25.0, 0.5, 6.25).micro_usd(&usage), 7_500);
    /// ```
    pub fn micro_usd(&self, usage: &crate::usage::Usage) -> u64 {
        // Dollars per million tokens are micro-dollars per token.
        let cost = usage.input_tokens.unwrap_or(0) as f64 * self.input
            + usage.output_tokens.unwrap_or(0) as f64 * self.output
            + usage.cache_read_input_tokens.unwrap_or(0) as f64 * self.cache_read
            + usage.cache_creation_input_tokens.unwrap_or(0) as f64 * self.cache_write;
        if cost.is_finite() && cost > 0.0 {
            cost.round() as u64
        } else {
            0
        }
    }
}

/// Prices per model, to turn token usage into the `tower_overload.cost`
/// counter. A model without a price costs nothing in the counter.
///
/// ```
/// use tower_overload::metrics::{PriceTable, Prices};
/// let prices = PriceTable::new()
///     .price("claude-opus-4-6", Prices::per_million(5.0, 25.0, 0.5, 6.25))
///     .price("claude-haiku-4-5", Prices::per_million(1.0, 5.0, 0.1, 1.25));
/// assert_eq!(prices.get("claude-haiku-4-5").unwrap().input, 1.0);
/// assert!(prices.get("gpt").is_none());
/// ```
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    prices: Arc<HashMap<String, Prices>>,
}

impl PriceTable {
    /// No prices.
    ///
    /// ```
    /// # use tower_overload::metrics::PriceTable;
    /// assert!(PriceTable::new().get("claude-opus-4-6").is_none());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the prices of `model`.
    ///
    /// ```
    /// # use tower_overload::metrics::{PriceTable, Prices};
    /// let prices = PriceTable::new().price("claude-sonnet-4-6", Prices::per_million(3.0, 15.0, 0.3, 3.75));
    /// ```
    pub fn price(mut self, model: impl Into<String>, prices: Prices) -> Self {
        Arc::make_mut(&mut self.prices).insert(model.into(), prices);
        self
    }

    /// The prices of `model`, if set.
    ///
    /// ```
    /// # use tower_overload::metrics::{PriceTable, Prices};
    /// assert!(PriceTable::new().get("claude-opus-4-6").is_none());
    /// ```
    pub fn get(&self, model: &str) -> Option<&Prices> {
        self.prices.get(model)
    }
}
