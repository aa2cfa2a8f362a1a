//! Fuzzes the client-frame decoder and validator: any bytes a client might send as a text
//! frame must be decoded or refused with a well-formed error, never panic (the properties are in
//! `chat_protocol::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chat_protocol::fuzzing::client_frame(data);
});
