//! `keycast clients add|list|remove`: registered apps, from the operator's shell. They open
//! the database directly (as `keycast migrate` does), so they work before the service is
//! up; the admin API (`/api/admin/clients`) does the same over HTTP.

use anyhow::Context;
use keycast_core::clients::{self, NewClient, RegisteredClient};
use keycast_db::now_unix;
use serde_json::json;

use crate::config::Config;
use crate::serve::Access;

/// `keycast clients add`: registers the app and prints its new `client_id`.
///
/// # Errors
/// An invalid registration (naming the field), or the database's errors.
pub async fn add(config: &Config, new: NewClient, as_json: bool) -> anyhow::Result<()> {
    let db = crate::serve::open_database(config, Access::Write).await?;
    let client = clients::register(&db, &new, now_unix()).await;
    db.close().await;
    let client = client.context("cannot register the app")?;
    if as_json {
        println!("{}", json!(client));
    } else {
        println!("registered {:?} as client_id {}", client.name, client.client_id);
        print_uris(&client);
    }
    Ok(())
}

/// `keycast clients list`.
///
/// # Errors
/// The database's errors.
pub async fn list(config: &Config, as_json: bool) -> anyhow::Result<()> {
    let db = crate::serve::open_database(config, Access::Read).await?;
    let listed = clients::list(&db).await;
    db.close().await;
    let listed = listed.context("cannot list the registered apps")?;
    if as_json {
        println!("{}", json!({ "clients": listed }));
        return Ok(());
    }
    for client in &listed {
        println!("{}  {}", client.client_id, client.name);
        print_uris(client);
    }
    println!("{} registered apps", listed.len());
    Ok(())
}

/// `keycast clients remove`.
///
/// # Errors
/// An unknown client id, or the database's errors.
pub async fn remove(config: &Config, client_id: &str) -> anyhow::Result<()> {
    let db = crate::serve::open_database(config, Access::Write).await?;
    let removed = clients::remove(&db, client_id).await;
    db.close().await;
    if !removed? {
        anyhow::bail!("there is no registered app {client_id:?} (see `keycast clients list`)");
    }
    println!("removed {client_id}; grants it already has stay until their owners revoke them");
    Ok(())
}

fn print_uris(client: &RegisteredClient) {
    for uri in &client.redirect_uris {
        println!("    redirect_uri {uri}");
    }
    if let Some(logo) = &client.logo_url {
        println!("    logo_url     {logo}");
    }
}
