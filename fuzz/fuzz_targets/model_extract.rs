//! `model::extract` on arbitrary bytes: never a panic; a model found is found again after rewriting.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_overload::model;

fuzz_target!(|data: &[u8]| {
    if let Some(found) = model::extract(data) {
        let rewritten = model::rewrite(data, &found).expect("a body with a model can be rewritten");
        assert_eq!(model::extract(&rewritten).as_deref(), Some(found.as_ref()));
    }
});
