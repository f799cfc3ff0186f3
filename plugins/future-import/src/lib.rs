//! Imports `test:beyond/teleport`, which no wasmq host provides: uploading it must fail with a
//! clear "unsupported imports" error instead of failing later at instantiation.

wit_bindgen::generate!({
    inline: "
        package test:beyond@1.0.0;
        interface teleport {
            beam: func(to: string) -> bool;
        }
        world beyond {
            import teleport;
            export run: func() -> bool;
        }
    ",
});

struct Future;

impl Guest for Future {
    fn run() -> bool {
        test::beyond::teleport::beam("mars")
    }
}

export!(Future);
