//! Port-I/O devices of a PC that guests expect: COM1, the i8042 reset line, debug exit.

pub mod debug_exit;
pub mod i8042;
pub mod post;
pub mod serial;

pub use debug_exit::{DebugExit, DEBUG_EXIT_PORT};
pub use i8042::{I8042, I8042_COMMAND_PORT, I8042_DATA_PORT};
pub use post::{PostPort, POST_PORT};
pub use serial::{SerialConsole, SerialInput, COM1_PORT};
