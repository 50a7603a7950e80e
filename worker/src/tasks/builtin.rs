//! The task kinds built into procjob, listed above the registry: the
//! [`Registry`] knows how to hold kinds, not which ones exist, so the list of
//! built-in ones lives here, next to the kinds themselves.

use crate::registry::Registry;
use crate::tasks::matmul::{Dot, MatmulBlock};

impl Registry {
    /// The task kinds built into procjob: the matrix product, and under the
    /// `test-tasks` feature the misbehaving kinds of the failure tests.
    pub fn builtin() -> Registry {
        let r = Registry::new().with::<MatmulBlock>().with::<Dot>();
        #[cfg(feature = "test-tasks")]
        let r = crate::tasks::testkinds::register(r);
        r
    }
}
