//! `bad-ports`: vCPU 0 writes pseudo-random bytes to 2000 pseudo-random ports and reads
//! 2000 more (fixed-seed xorshift), skipping the ports the test depends on or that could
//! end/reset the machine: 0x3f8-0x3ff (UART), 0xf4 (debug exit), 0x60-0x64 (i8042),
//! 0x20-0x21 and 0xa0-0xa1 (PICs), 0x40-0x43 (PIT), 0x61, 0xcf8-0xcff (PCI config,
//! reset control). Then prints `bad-ports: survived` and exits 0. Other vCPUs park.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

const WRITES: usize = 2000;
const READS: usize = 2000;

fn kmain(cpu: usize) -> ! {
    if cpu != 0 {
        rt::park();
    }
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..WRITES {
        let port = rng.port();
        let value = rng.next() as u8;
        // SAFETY: `port` is none of the ports the test or the machine depends on.
        unsafe { rt::outb(port, value) };
    }
    for _ in 0..READS {
        let port = rng.port();
        // SAFETY: as above.
        core::hint::black_box(unsafe { rt::inb(port) });
    }
    println!("bad-ports: survived");
    rt::exit(0)
}

/// Whether `port` must not be touched.
fn skipped(port: u16) -> bool {
    matches!(
        port,
        0x3f8..=0x3ff | 0xf4 | 0x60..=0x64 | 0x20..=0x21 | 0xa0..=0xa1 | 0x40..=0x43 | 0xcf8..=0xcff
    )
}

/// xorshift64 pseudo-random generator.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A pseudo-random port that is not [`skipped`].
    fn port(&mut self) -> u16 {
        loop {
            let port = (self.next() >> 16) as u16;
            if !skipped(port) {
                return port;
            }
        }
    }
}
