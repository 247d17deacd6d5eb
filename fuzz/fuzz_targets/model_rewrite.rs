//! `model::rewrite` with an arbitrary new model: extract(rewrite(b, m)) == m, and when b's model
//! was written the way rewrite writes it, rewriting back restores b byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_overload::model;

fuzz_target!(|input: (&[u8], &str)| {
    let (body, new_model) = input;
    let Some(rewritten) = model::rewrite(body, new_model) else {
        return;
    };
    assert_eq!(model::extract(&rewritten).as_deref(), Some(new_model));
    let original = model::extract(body).expect("rewrite found a model, so extract does");
    let canonical = model::rewrite(body, &original).expect("a body with a model");
    if canonical == body {
        let restored = model::rewrite(&rewritten, &original).expect("still has a model");
        assert_eq!(&restored[..], body);
    }
});
