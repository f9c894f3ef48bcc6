// `sqlx::migrate!` embeds the migration files at compile time, but cargo does not know the
// crate depends on them: without this, a new migration file is not picked up until some
// Rust source of this crate changes (sqlx's documented remedy).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
