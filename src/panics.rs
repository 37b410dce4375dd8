//! The text of a caught panic, for the error that reports it (the data loader's workers, the inference workers and
//! the HTTP handlers all turn panics into errors instead of dying).

use std::any::Any;

/// The message `payload` was raised with: `panic!` gives a `&str` or a `String`; anything else (from
/// `std::panic::panic_any`) has no text. Takes the box itself because a `&Box<dyn Any>` would coerce to a
/// `&dyn Any` of the box and never match.
pub fn message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => match payload.downcast_ref::<&str>() {
            Some(text) => (*text).to_string(),
            None => "a panic without a message".to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_of_literal_formatted_and_other_panics() {
        let caught = |f: fn()| std::panic::catch_unwind(f).expect_err("it panics");
        let literal = caught(|| panic!("the network exploded"));
        let formatted = caught(|| panic!("batch {} failed", 7));
        let other = caught(|| std::panic::panic_any(42u8));
        assert_eq!(message(literal), "the network exploded");
        assert_eq!(message(formatted), "batch 7 failed");
        assert_eq!(message(other), "a panic without a message");
    }
}
