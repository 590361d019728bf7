//! Pure types and rules of yakuba: identities, tenancy, roles and the authorisation policy,
//! password and session policy, input validation, the CSV import plan and the audit hash
//! chain. Nothing here performs I/O; time comes in through [`clock::Clock`].

pub mod alerts;
pub mod audit;
pub mod clock;
pub mod ids;
pub mod import;
pub mod password;
pub mod policy;
pub mod role;
pub mod settings;
pub mod templates;
pub mod time;
pub mod usage;
pub mod validate;

pub use clock::{Clock, ManualClock, SystemClock};
pub use role::Role;
